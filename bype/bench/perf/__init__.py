"""Performance models the benchmarks compare against: `flops` counts a step's work on the model (FLOPs,
bytes, operators, collectives); `cost_model` turns that work and a device's figures into a predicted step
time. `bype bench costmodel` and `bype bench scaling` print both beside what they measure."""
