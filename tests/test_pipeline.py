"""A real diffusers pipeline end to end, offline, with tiny random components."""

import numpy as np
import pytest
import torch

import rtlynx

diffusers = pytest.importorskip("diffusers")


def tiny_dit_pipeline():
    torch.manual_seed(0)
    transformer = diffusers.DiTTransformer2DModel(
        sample_size=8, num_layers=2, patch_size=2, attention_head_dim=8, num_attention_heads=2, in_channels=4,
        out_channels=8, activation_fn="gelu-approximate", num_embeds_ada_norm=1000, norm_type="ada_norm_zero",
        norm_elementwise_affine=False)
    vae = diffusers.AutoencoderKL(sample_size=16, latent_channels=4, block_out_channels=(8,),
                                  norm_num_groups=8, down_block_types=("DownEncoderBlock2D",),
                                  up_block_types=("UpDecoderBlock2D",))
    return diffusers.DiTPipeline(transformer=transformer.eval(), vae=vae.eval(), scheduler=diffusers.DDIMScheduler())


def run(pipe):
    return pipe(class_labels=[1, 7], num_inference_steps=3, generator=torch.Generator().manual_seed(3),
                output_type="np").images


def test_dit_pipeline_end_to_end():
    pipe = tiny_dit_pipeline()
    dense = run(pipe)
    rtlynx.sparsify(pipe)  # a pipeline is accepted: its .transformer is sparsified
    layers = rtlynx.sparse_layers(pipe.transformer)
    assert layers and all(n.startswith("transformer_blocks.") for n in layers)
    assert not any("norm" in n or "emb" in n for n in layers)  # adaLN-Zero conditioning stays dense
    sparse = run(pipe)
    assert sparse.shape == dense.shape == (2, 8, 8, 3)
    assert np.isfinite(sparse).all() and not np.array_equal(sparse, dense)
    with rtlynx.dense_mode(pipe.transformer):
        assert np.array_equal(run(pipe), dense)


@pytest.mark.parametrize("kind", ["flux", "qwen-image", "z-image"])
def test_tiny_pipelines_are_deterministic(kind):
    # built in memory, the text encoders and VAE used to stay in training mode (dropout): same seed, other images
    from rtlynx.testing import BUILDERS, PROMPTS, SIZE

    torch.manual_seed(0)
    pipe = BUILDERS[kind]()
    assert not any(m.training for m in pipe.components.values() if isinstance(m, torch.nn.Module))

    def gen():
        return pipe(PROMPTS[:1], height=SIZE, width=SIZE, num_inference_steps=2, output_type="pt",
                    generator=torch.Generator().manual_seed(0)).images

    assert torch.equal(gen(), gen())
