"""Tiny models to try every command on a CPU in minutes, built offline (random weights, no model hub).

- ``save_tiny_pipeline(kind, path)``: a FLUX / Qwen-Image / Z-Image diffusers pipeline folder, for the own-model
  commands (``rtlynx calibrate / train-lora / generate / select --model PATH``): the tiny transformers of
  rtlynx.integrations.diffusers, tiny text encoders of the real classes, small VAEs, a word-level tokenizer.
- ``save_tiny_miniflux(path)``: a one-block mini-FLUX folder with a prompts file, for ``rtlynx demo --model PATH``
  and the calibrate / train-lora / demo loop.

    python -m rtlynx.testing flux tiny-flux      # then: rtlynx generate --model tiny-flux --prompt "a red cat"
"""

from __future__ import annotations

from pathlib import Path

import torch

from .demo import DEMO_PROMPTS
from .integrations.diffusers import tiny_transformer
from .models.miniflux import MiniFlux, WordTokenizer

WORDS = ("a an the red blue green cat dog house tree sky sun on in of with and photo painting small big "
         "user assistant system describe image").split()
PROMPTS = ["a red cat", "a blue dog in the sky", "a photo of a small house", "a painting of a big tree"]
QWEN_SPECIALS = ["<|endoftext|>", "<unk>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def word_tokenizer(specials: list[str], max_len: int, **special_tokens):
    """A transformers fast tokenizer over WORDS (+ punctuation), split on spaces and punctuation."""
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {t: i for i, t in enumerate(specials + WORDS + list("<>|_:/,.\n"))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=specials[1]))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=max_len, **special_tokens), len(vocab)


def _kl_vae(**kw):
    import diffusers

    return diffusers.AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                                   up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16),
                                   layers_per_block=1, latent_channels=4, norm_num_groups=4, use_quant_conv=False,
                                   use_post_quant_conv=False, **kw)


def eval_pipeline(pipe):
    """Every module of ``pipe`` in eval mode, as ``from_pretrained`` leaves them: freshly built text encoders and VAEs
    are in training mode, and their dropout would make two runs with the same seed differ."""
    for v in pipe.components.values():
        if isinstance(v, torch.nn.Module):
            v.eval()
    return pipe


def flux_pipeline():
    import diffusers
    import transformers

    tok, v = word_tokenizer(["<pad>", "<unk>", "<s>", "</s>"], 16, pad_token="<pad>", unk_token="<unk>",
                            bos_token="<s>", eos_token="</s>")
    clip = transformers.CLIPTextModel(transformers.CLIPTextConfig(
        vocab_size=v, hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=4,
        max_position_embeddings=16, projection_dim=32, eos_token_id=3, bos_token_id=2, pad_token_id=0))
    t5 = transformers.T5EncoderModel(transformers.T5Config(
        vocab_size=v, d_model=32, d_kv=8, d_ff=37, num_layers=1, num_heads=4, pad_token_id=0, eos_token_id=3,
        decoder_start_token_id=0))
    return eval_pipeline(diffusers.FluxPipeline(scheduler=diffusers.FlowMatchEulerDiscreteScheduler(), vae=_kl_vae(
        shift_factor=0.06, scaling_factor=1.5), text_encoder=clip, tokenizer=tok, text_encoder_2=t5, tokenizer_2=tok,
        transformer=tiny_transformer("flux")))


def qwen_image_pipeline():
    import diffusers
    import transformers

    tok, v = word_tokenizer(QWEN_SPECIALS, 64, pad_token="<|endoftext|>", unk_token="<unk>")
    cfg = transformers.Qwen2_5_VLConfig(
        text_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=v, rope_theta=1e6,
                         rope_scaling={"rope_type": "default", "mrope_section": [1, 1, 2]}),
        vision_config=dict(depth=1, hidden_size=16, intermediate_size=16, num_heads=2, out_hidden_size=32),
        vocab_size=v, hidden_size=32)
    vae = diffusers.AutoencoderKLQwenImage(base_dim=24, z_dim=4, dim_mult=[1, 2, 4], num_res_blocks=1,
                                           temperal_downsample=[False, True], latents_mean=[0.0] * 4,
                                           latents_std=[1.0] * 4)
    return eval_pipeline(diffusers.QwenImagePipeline(scheduler=diffusers.FlowMatchEulerDiscreteScheduler(), vae=vae,
                                       text_encoder=transformers.Qwen2_5_VLForConditionalGeneration(cfg),
                                       tokenizer=tok, transformer=tiny_transformer("qwen-image")))


def z_image_pipeline():
    import diffusers
    import transformers

    tok, v = word_tokenizer(QWEN_SPECIALS, 32, pad_token="<|endoftext|>", unk_token="<unk>")
    tok.chat_template = CHAT_TEMPLATE
    te = transformers.Qwen3Model(transformers.Qwen3Config(
        hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        head_dim=8, vocab_size=v))
    return eval_pipeline(diffusers.ZImagePipeline(scheduler=diffusers.FlowMatchEulerDiscreteScheduler(), vae=_kl_vae(
        shift_factor=0.1, scaling_factor=0.3), text_encoder=te, tokenizer=tok, transformer=tiny_transformer("z-image")))


BUILDERS = {"flux": flux_pipeline, "qwen-image": qwen_image_pipeline, "z-image": z_image_pipeline}
SIZE = 32  # image side in pixels every tiny pipeline accepts


def save_tiny_pipeline(kind: str, path: Path, seed: int = 0) -> Path:
    """Write a tiny random pipeline of ``kind`` ("flux", "qwen-image", "z-image") to ``path`` (its images are
    SIZE x SIZE pixels) and a prompts file ``path/prompts.txt``."""
    if kind not in BUILDERS:
        raise ValueError(f"unknown tiny pipeline {kind!r}; choose one of {sorted(BUILDERS)}")
    torch.manual_seed(seed)
    BUILDERS[kind]().save_pretrained(str(path))
    (Path(path) / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    return Path(path)


def save_tiny_miniflux(path: Path, seed: int = 0) -> Path:
    """Write a one-block mini-FLUX (width 64, random weights) and ``path/prompts.txt`` (the demo prompts)."""

    torch.manual_seed(seed)
    cfg = {"width": 64, "head_dim": 32, "axes_dims_rope": [8, 12, 12], "num_layers": 1, "num_single_layers": 1,
           "text_width": 32, "text_layers": 1, "text_heads": 2, "num_steps": 2}
    model = MiniFlux(cfg, WordTokenizer.fit(DEMO_PROMPTS, max_len=8)).eval()
    path = Path(path)
    model.save_pretrained(path, dtype=None)
    (path / "prompts.txt").write_text("\n".join(DEMO_PROMPTS))
    return path


def main(argv=None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m rtlynx.testing", description="write a tiny random model to try "
                                "the rtlynx commands on a CPU")
    p.add_argument("kind", choices=[*BUILDERS, "miniflux"], help="which model")
    p.add_argument("out", help="output folder")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights (default: 0)")
    args = p.parse_args(argv)
    if args.kind == "miniflux":
        path = save_tiny_miniflux(Path(args.out), args.seed)
    else:
        path = save_tiny_pipeline(args.kind, Path(args.out), args.seed)
    print(f"wrote {path} (prompts: {path / 'prompts.txt'})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
