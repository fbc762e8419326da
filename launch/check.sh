# Sourced by the launchers: `bype train --check` once, before any worker or process group starts, so a
# bad key, a too-large M or a damaged checkpoint costs one line instead of one per rank plus torchrun's
# ChildFailedError. The Python beside the launcher program ($1: torchrun, deepspeed) runs it; PYTHON
# overrides. $2 is the run's total process count (empty when the launcher cannot know it, e.g. an
# elastic node range): the batch must divide over it, and a ZeRO checkpoint resumes only on as many.
# The remaining arguments are the workers' `bype train` arguments.
check_config() {
  local bin world=()
  bin=$(dirname "$(command -v "$1" || echo "$1")")
  [[ "$2" =~ ^[0-9]+$ ]] && world=(--world-size "$2")
  shift 2
  local py=${PYTHON:-$( [ -x "$bin/python" ] && echo "$bin/python" || echo python3 )}
  "$py" -m bype.cli train --check "${world[@]}" "$@"
}

# a * b when both are plain numbers, else nothing (torchrun accepts ranges such as --nnodes 1:4)
world_of() {
  [[ "$1" =~ ^[0-9]+$ && "$2" =~ ^[0-9]+$ ]] && echo $(( $1 * $2 )) || true
}
