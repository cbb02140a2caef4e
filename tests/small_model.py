"""The small decoder shape the model-level tests build: 2 layers, width 32, 4 heads, 16 tokens,
a 100-id vocabulary padded to a multiple of 8 (overrides of the ``tiny`` preset)."""

SMALL = (
    "model.num_layers=2",
    "model.hidden_size=32",
    "model.num_attention_heads=4",
    "model.ffn_hidden_size=48",
    "model.seq_length=16",
    "model.vocab_size=100",
    "model.vocab_pad_multiple=8",
)
