"""The course's shared package: what each chapter notebook builds, importable by later ones.

Generated modules (written by `python -m utils.export` from the notebooks' `#| export`
cells; edit the notebook, never the module):

| module        | notebook                    | exports                                                   |
| ------------- | --------------------------- | --------------------------------------------------------- |
| `utils.text`  | notebooks/02_text_data      | SimpleTokenizerV1, SimpleTokenizerV2, get_gpt2_tokenizer, |
|               |                             | GPTDatasetV1, create_dataloader_v1                        |
| `utils.attention` | notebooks/03_attention  | CausalAttention, MultiHeadAttention                       |
| `utils.model` | notebooks/04_gpt_model      | GPTConfig, GPT2_SMALL_124M, GPT2_MEDIUM_355M,             |
|               |                             | GPT2_LARGE_774M, GPT2_XL_1558M, GPT_TINY, GPT2_PRESETS,   |
|               |                             | LayerNorm, GELU, FeedForward, TransformerBlock, GPTModel, |
|               |                             | generate_text_simple                                      |

Hand-written modules (no notebook teaches them):

| module           | what it holds                                                        |
| ---------------- | -------------------------------------------------------------------- |
| `utils.assets`   | the registry of downloadable files (URL, backup URL, size, sha256)    |
| `utils.download` | `fetch(name)`: cache, offline mirror, then network, always verified   |
| `utils.device`   | `get_device()`: CUDA, else Apple MPS, else CPU                        |
| `utils.export`   | the notebook -> module exporter (`python -m utils.export`)            |
| `utils.rerun`    | re-executes notebooks and saves outputs (`python -m utils.rerun`)     |

Shape legend used in comments throughout: B batch, T tokens, C embedding dim,
H heads, D head dim, V vocabulary size.
"""
