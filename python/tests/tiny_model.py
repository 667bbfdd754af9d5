"""Creates a tiny random-weight Llama and a local byte-level BPE tokenizer (no Hub access):
hidden 128, 2 layers, 4 heads, 2 KV heads, head_dim 32, vocab 1024, bf16 (../shared/VLLM-CPU.md)."""

import os
import sys

VOCAB = 1024


def make(out: str, seed: int = 0) -> str:
    if os.path.exists(os.path.join(out, "config.json")) and os.path.exists(os.path.join(out, "tokenizer.json")):
        return out
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=VOCAB, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=1024,
        torch_dtype="bfloat16", bos_token_id=1, eos_token_id=2,
    )
    model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    os.makedirs(out, exist_ok=True)
    model.save_pretrained(out)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    text = ["The quick brown fox jumps over the lazy dog.", "cwm freezes and thaws KV caches.",
            "Long conversations survive restarts.", "Hello world, this is a tiny model."] * 20
    tok.train_from_iterator(text, trainer)
    n = tok.get_vocab_size()
    tok.add_tokens([f"<extra_{i}>" for i in range(VOCAB - n)])
    assert tok.get_vocab_size() == VOCAB, tok.get_vocab_size()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>")
    fast.save_pretrained(out)
    return out


if __name__ == "__main__":
    print(make(sys.argv[1]))
