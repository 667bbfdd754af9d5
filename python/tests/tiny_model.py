"""Creates a small random-weight Llama and a local byte-level BPE tokenizer (no Hub access):
hidden 512, 2 layers, 8 heads, 2 KV heads, head_dim 64, vocab 1024, bf16. Wider than the
hidden-128 model the tests first used, so that its logprobs show how they were computed: 1 vs 2
OpenMP threads moved a 400-token prompt's logprobs (by 2e-4) and a top-3 set where hidden 128
stayed bit-equal, and a KV block computed in another context moves them by up to 0.4 (0.08 with
hidden 128). Still a few seconds of CPU per vLLM run."""

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
        vocab_size=VOCAB, hidden_size=512, intermediate_size=1024, num_hidden_layers=2,
        num_attention_heads=8, num_key_value_heads=2, head_dim=64, max_position_embeddings=1024,
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
