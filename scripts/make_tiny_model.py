"""Build a tiny Qwen2 model that the real vLLM CPU build serves: no download, about 0.7 MB.

    python make_tiny_model.py OUT_DIR [--seed N]

The seed draws the weights (0 unless told); the tokenizer and config are the same for every seed, so
two seeds make two checkpoints of one model, for weight updates in place (`mvllmctl weights update`).

Hidden 128, 2 layers, 2 attention heads and 1 KV head (head_dim 64: the CPU attention backend refuses
head_dim 16), random weights, a byte-level BPE tokenizer trained on a few lines, and a chat template.
Its output is gibberish, but the serving path is vLLM's real one.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
TEXT = [
    "The quick brown fox jumps over the lazy dog.",
    "Reinforcement learning from many rollouts needs fast batch generation.",
    "Several vLLM servers with low tensor parallelism beat one large server.",
    "Hello, world! What is the answer? Say something short.",
] * 50


def main(out: Path, seed: int = 0) -> None:
    out.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(vocab_size=512, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())  # fmt: skip
    tok.train_from_iterator(TEXT, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   bos_token=None, unk_token=None)  # fmt: skip
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out)
    config = Qwen2Config(
        vocab_size=tok.get_vocab_size(),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=2048,
        eos_token_id=tok.token_to_id("<|im_end|>"),
        bos_token_id=tok.token_to_id("<|endoftext|>"),
        tie_word_embeddings=True,
        torch_dtype="float32",
    )
    torch.manual_seed(seed)
    Qwen2ForCausalLM(config).save_pretrained(out, safe_serialization=True)
    print(f"tiny model in {out}")


if __name__ == "__main__":
    if len(sys.argv) not in (2, 4) or (len(sys.argv) == 4 and sys.argv[2] != "--seed"):
        sys.exit("usage: python make_tiny_model.py OUT_DIR [--seed N]")
    main(Path(sys.argv[1]), int(sys.argv[3]) if len(sys.argv) == 4 else 0)
