"""Architecture numbers of well-known models, for planning offline (no download): transformers config
class name and keyword arguments, and the task the planner builds the model for."""

KNOWN = {
    "llama-2-7b": ("LlamaConfig", "causal-lm", dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                   num_attention_heads=32, num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096,
                   rms_norm_eps=1e-5)),
    "llama-2-13b": ("LlamaConfig", "causal-lm", dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40,
                    num_attention_heads=40, num_key_value_heads=40, vocab_size=32000, max_position_embeddings=4096,
                    rms_norm_eps=1e-5)),
    "llama-3-8b": ("LlamaConfig", "causal-lm", dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                   num_attention_heads=32, num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192,
                   rms_norm_eps=1e-5, rope_theta=500000.0)),
    "mistral-7b": ("MistralConfig", "causal-lm", dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                   num_attention_heads=32, num_key_value_heads=8, vocab_size=32000, max_position_embeddings=32768,
                   rms_norm_eps=1e-5, sliding_window=4096)),
    "vit-b/16": ("ViTConfig", "image-classification", dict(hidden_size=768, intermediate_size=3072,
                 num_hidden_layers=12, num_attention_heads=12, image_size=224, patch_size=16, num_labels=1000)),
    "vit-l/16": ("ViTConfig", "image-classification", dict(hidden_size=1024, intermediate_size=4096,
                 num_hidden_layers=24, num_attention_heads=16, image_size=224, patch_size=16, num_labels=1000)),
    "roberta-base": ("RobertaConfig", "sequence-classification", dict(hidden_size=768, intermediate_size=3072,
                     num_hidden_layers=12, num_attention_heads=12, vocab_size=50265, max_position_embeddings=514,
                     type_vocab_size=1, pad_token_id=1, num_labels=2)),
    "gpt2": ("GPT2Config", "causal-lm", dict(n_embd=768, n_layer=12, n_head=12, vocab_size=50257, n_positions=1024)),
}
