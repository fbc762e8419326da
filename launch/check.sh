# Sourced by the launchers: `bype train --check` once, before any worker or process group starts, so a
# bad key, a too-large M or a damaged checkpoint costs one line instead of one per rank plus torchrun's
# ChildFailedError. The Python beside the launcher program ($1: torchrun, deepspeed) runs it; PYTHON
# overrides. The remaining arguments are the workers' `bype train` arguments.
check_config() {
  local bin
  bin=$(dirname "$(command -v "$1" || echo "$1")")
  shift
  local py=${PYTHON:-$( [ -x "$bin/python" ] && echo "$bin/python" || echo python3 )}
  "$py" -m bype.cli train --check "$@"
}
