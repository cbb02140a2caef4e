"""megatron-qk: upper-layer Q/K learning-rate timing for Megatron-Core GPT pretraining.

See README.md for the user guide and docs/RUN_DIRECTORY.md for the run-directory contract that
the trainer writes and every analysis command reads.
"""

__version__ = "0.1.0"
