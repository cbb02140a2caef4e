"""megatron-qk: upper-layer Q/K learning-rate timing for Megatron-Core GPT pretraining.

See README.md for the user guide and ../shared/DESIGN.md (in the development checkout) for the
contracts between the parts.
"""

__version__ = "0.1.0"
