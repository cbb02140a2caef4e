"""The upper-Q/K ablation's sample budget (torch-free: ``megatron-qk diagnose --help`` shows it).

Used by :mod:`megatron_qk.diagnostics.ablation` and :mod:`megatron_qk.analysis.diagnose`.
"""

#: 10% of the paper's smallest 270M ablation effect (+0.35 ppl, Section 5.3).
TARGET_SE = 0.035

# Upper-Q/K ablation sample: at most the 270M recipes' whole validation set (4 x 512 sequences,
# 2.1M tokens), at least 64 sequences, stopping once the standard errors are below TARGET_SE.
ABLATION_MAX_SEQUENCES = 2048
ABLATION_MIN_SEQUENCES = 64
