"""negmerge-bench: the harness. config -> data/models -> candidate pool -> methods -> select -> metrics."""

from bench.numerics import apply_environment as _apply_numerics_environment

# Before anything imports torch: pin the CPU kernels (bench.numerics; NEGMERGE_NUMERICS=native opts out).
_apply_numerics_environment()
