"""The search for per-GPU kernel configurations (``python -m autotune.tune``; ``autotune.tasks`` holds what each
kernel's search times and checks). The shipped tables and their lookup are the library's: ``nqkernels.store``."""
