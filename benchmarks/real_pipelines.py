"""The real-size diffusers pipelines the speed benchmarks time (benchmarks/stack.py): FLUX.1-dev, Qwen-Image and
Z-Image with their published configurations and random weights, built offline on the GPU in bf16 (time does not
depend on the weight values), word-level tokenizers (rtlynx.testing.word_tokenizer)."""

from __future__ import annotations

import contextlib
import inspect
import sys
from pathlib import Path

import torch

from rtlynx.testing import CHAT_TEMPLATE, QWEN_SPECIALS, eval_pipeline, word_tokenizer

sys.path.insert(0, str(Path(__file__).resolve().parent))
import e2e  # noqa: E402  the real-config transformer builder

# FLUX.1-dev's published component configurations (text_encoder, text_encoder_2, vae, scheduler)
CLIP_L = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
              max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768, bos_token_id=0, eos_token_id=2,
              pad_token_id=1)
T5_XXL = dict(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
              feed_forward_proj="gated-gelu", relative_attention_num_buckets=32, relative_attention_max_distance=128,
              layer_norm_epsilon=1e-6, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
VAE = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
           up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
           act_fn="silu", latent_channels=16, norm_num_groups=32, sample_size=1024, scaling_factor=0.3611,
           shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False)
SCHEDULER = dict(base_image_seq_len=256, base_shift=0.5, max_image_seq_len=4096, max_shift=1.15,
                 num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True)
# Qwen-Image's and Z-Image's text encoders (published configurations) and schedulers
QWEN25_VL_7B = dict(
    text_config=dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                     num_key_value_heads=4, vocab_size=152064, max_position_embeddings=128000, rope_theta=1e6,
                     rms_norm_eps=1e-6, rope_scaling={"rope_type": "default", "mrope_section": [16, 24, 24]}),
    vision_config=dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=3584,
                       patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                       fullatt_block_indexes=[7, 15, 23, 31]),
    vocab_size=152064, hidden_size=3584)
QWEN3_4B = dict(hidden_size=2560, intermediate_size=9728, num_hidden_layers=36, num_attention_heads=32,
                num_key_value_heads=8, head_dim=128, vocab_size=151936, max_position_embeddings=40960, rope_theta=1e6,
                rms_norm_eps=1e-6, tie_word_embeddings=True)
QWEN_SCHEDULER = dict(base_image_seq_len=256, base_shift=1.0986, max_image_seq_len=8192, max_shift=1.0986,
                      num_train_timesteps=1000, shift=1.0, shift_terminal=0.02, time_shift_type="exponential",
                      use_dynamic_shifting=True)
ZIMAGE_SCHEDULER = dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=False)
MODEL_NAMES = {"flux": "FLUX.1-dev", "qwen-image": "Qwen-Image", "z-image": "Z-Image"}


@contextlib.contextmanager
def _building(device: str):
    """Modules built directly on ``device`` in bf16 (T5-XXL does not fit the host in fp32 quickly)."""
    prev = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            yield
    finally:
        torch.set_default_dtype(prev)


def flux_dev_pipeline(device: str = "cuda"):
    """FluxPipeline with FLUX.1-dev's configurations, random weights, word-level tokenizers (no download)."""
    import diffusers
    import transformers

    specials = dict(pad_token="<pad>", unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    tok_clip, _ = word_tokenizer(["<pad>", "<unk>", "<s>", "</s>"], 77, **specials)
    tok_t5, _ = word_tokenizer(["<pad>", "<unk>", "<s>", "</s>"], 512, **specials)
    with _building(device):
        clip = transformers.CLIPTextModel(transformers.CLIPTextConfig(**CLIP_L))
        t5 = transformers.T5EncoderModel(transformers.T5Config(**T5_XXL))
        vae = diffusers.AutoencoderKL(**VAE)
    pipe = diffusers.FluxPipeline(
        scheduler=diffusers.FlowMatchEulerDiscreteScheduler(**SCHEDULER), vae=vae, text_encoder=clip,
        tokenizer=tok_clip, text_encoder_2=t5, tokenizer_2=tok_t5, transformer=new_transformer(device))
    return _ready(pipe, device)


def qwen_image_pipeline(device: str = "cuda"):
    """QwenImagePipeline with Qwen-Image's configurations, random weights, a word-level tokenizer."""
    import diffusers
    import transformers

    tok, _ = word_tokenizer(QWEN_SPECIALS, 1024, pad_token="<|endoftext|>", unk_token="<unk>")
    with _building(device):
        te = transformers.Qwen2_5_VLForConditionalGeneration(transformers.Qwen2_5_VLConfig(**QWEN25_VL_7B))
        vae = diffusers.AutoencoderKLQwenImage()
    pipe = diffusers.QwenImagePipeline(scheduler=diffusers.FlowMatchEulerDiscreteScheduler(**QWEN_SCHEDULER), vae=vae,
                                       text_encoder=te, tokenizer=tok,
                                       transformer=new_transformer(device, "qwen-image"))
    return _ready(pipe, device)


def z_image_pipeline(device: str = "cuda"):
    """ZImagePipeline with Z-Image's transformer, the FLUX VAE, a Qwen3-4B text encoder, a word-level tokenizer."""
    import diffusers
    import transformers

    tok, _ = word_tokenizer(QWEN_SPECIALS, 1024, pad_token="<|endoftext|>", unk_token="<unk>")
    tok.chat_template = CHAT_TEMPLATE
    with _building(device):
        te = transformers.Qwen3Model(transformers.Qwen3Config(**QWEN3_4B))
        vae = diffusers.AutoencoderKL(**VAE)
    pipe = diffusers.ZImagePipeline(scheduler=diffusers.FlowMatchEulerDiscreteScheduler(**ZIMAGE_SCHEDULER), vae=vae,
                                    text_encoder=te, tokenizer=tok, transformer=new_transformer(device, "z-image"))
    return _ready(pipe, device)


PIPELINES = {"flux": flux_dev_pipeline, "qwen-image": qwen_image_pipeline, "z-image": z_image_pipeline}


def _ready(pipe, device: str):
    pipe.to(device, torch.bfloat16)
    pipe.set_progress_bar_config(disable=True)
    return eval_pipeline(pipe)  # freshly built modules are in training mode (dropout)


def new_transformer(device: str, kind: str = "flux", tiny: bool = False):
    if tiny:
        from rtlynx.integrations.diffusers import tiny_transformer

        return tiny_transformer(kind)
    cls_name, cfg, _ = e2e.MODELS[kind]
    return e2e.build_model(cls_name, cfg, device)


def default_steps(pipe) -> int:
    """The pipeline's own default number of sampling steps (28 for FLUX, 50 for Qwen-Image and Z-Image)."""
    return inspect.signature(type(pipe).__call__).parameters["num_inference_steps"].default
