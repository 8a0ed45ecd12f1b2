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
| `utils.train` | notebooks/05_pretraining    | text_to_token_ids, token_ids_to_text, calc_loss_batch,    |
|               |                             | calc_loss_loader, evaluate_model,                         |
|               |                             | generate_and_print_sample, train_model_simple, plot_losses|
| `utils.generation` | notebooks/05_pretraining | generate (temperature, top-k, end token)               |
| `utils.checkpoint` | notebooks/05_pretraining | save_checkpoint, load_checkpoint, checkpoint_info,     |
|               |                             | chapter5_checkpoint, CheckpointError                      |
| `utils.pretrained` | notebooks/05_pretraining | load_weights_into_gpt, load_pretrained_gpt2            |
| `utils.fast`  | notebooks/08_going_faster   | SDPAttention, FastLayerNorm, FastGELU, set_impl, KVCache, |
|               |                             | forward_with_cache, CachedDecoder, bf16_supported,        |
|               |                             | fused_adamw, compile_model                                |
| `utils.train_extras` | notebooks/appendix_D_training_extras | lr_at_step, find_highest_gradient,   |
|               |                             | train_model                                               |
| `utils.classify` | notebooks/06_classification | create_balanced_dataset, random_split, SpamDataset,    |
|               |                             | calc_accuracy_loader, calc_class_loss_batch,              |
|               |                             | calc_class_loss_loader, evaluate_classifier,              |
|               |                             | train_classifier_simple, plot_values, classify_review     |
| `utils.lora`  | notebooks/appendix_E_lora   | LoRALayer, LinearWithLoRA, replace_linear_with_lora,      |
|               |                             | merge_lora                                                |
| `utils.instruct` | notebooks/07_instruction_finetuning | format_input, format_example,             |
|               |                             | split_instruction_data, InstructionDataset,               |
|               |                             | custom_collate_fn                                         |
| `utils.evaluation` | notebooks/07_instruction_finetuning | query_model, is_ollama_running,         |
|               |                             | generate_model_scores, calc_response_loss, rouge_l,       |
|               |                             | reference_overlap_scores                                  |

Hand-written modules (no notebook teaches them):

| module           | what it holds                                                        |
| ---------------- | -------------------------------------------------------------------- |
| `utils.assets`   | the registry of downloadable files (URL, backup URL, size, sha256)    |
| `utils.download` | `fetch(name)`: cache, offline mirror, then network, always verified   |
| `utils.device`   | `get_device()`: CUDA, else Apple MPS, else CPU                        |
| `utils.export`   | the notebook -> module exporter (`python -m utils.export`)            |
| `utils.rerun`    | re-executes notebooks and saves outputs (`python -m utils.rerun`)     |
| `utils.paths`    | repository root, checkpoint folder, quick mode                        |
| `utils.pretrain` | pretraining command, single process or DDP under `torchrun`          |
| `utils.chat`     | chat with an instruction-finetuned checkpoint (`python -m utils.chat`)|
| `utils.benchmark` | `python -m utils.benchmark`: the fast paths timed against the teaching code |
| `utils.standalone` | `python -m utils.standalone`: standalone notebook copies for Colab/Kaggle |

Shape legend used in comments throughout: B batch, T tokens, C embedding dim,
H heads, D head dim, V vocabulary size.
"""
