"""Every stage's compiled programs, built abstractly on a mesh: what they need.

``programs(config, mesh)`` returns, without allocating a parameter, the jitted
functions the stages run (the same objects: ``loop.train_step_fn``,
``targets.make_target_fn``, ``validation.scores``,
``generate.decode``) with abstract arguments placed on ``mesh`` by the
sharding rules; ``measure`` compiles one and reads XLA's memory and cost
analyses. The mesh may be made of devices this host does not have (a TPU
slice's, from ``jax.experimental.topologies``): the code branches on the
mesh's platform (``sharding.platform``), so the plan is the program that
runs there.

The package's modules, by idea: ``arguments`` (abstract arguments placed on
a mesh), ``programs`` (the stages' programs built from a config), ``flops``
(model FLOPs, and the matmuls counted in a traced program), ``measure``
(compiling one, reading what it needs).
"""

from distill.planning.arguments import array_bytes, on_mesh, processes
from distill.planning.flops import attention_flops, matmul_flops
from distill.planning.measure import Measure, measure
from distill.planning.programs import (
    Program,
    programs,
    student_programs,
    teacher_model_config,
)
