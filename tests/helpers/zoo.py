"""A zoo of stock models at their libraries' default init, built from code (nothing downloaded).

torchvision with `weights=None`, timm with `pretrained=False`, transformers with `from_config`
on small configs (few layers, small hidden sizes) so each family's own init code draws the
weights. Sizes are picked so the whole zoo builds in seconds on two cores.
"""

from __future__ import annotations

import contextlib
import io
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn


@dataclass(frozen=True)
class Stock:
    name: str                       # library/model
    family: str                     # cnn | vit | mlp-mixer | encoder | decoder | seq2seq | speech | ssm
    make: Callable[[], nn.Module]

    @property
    def library(self) -> str:
        return self.name.split("/", 1)[0]


def _torchvision(name: str, **kwargs) -> Callable[[], nn.Module]:
    def make():
        import torchvision.models as tvm

        module = tvm
        for part in name.split(".")[:-1]:  # e.g. "video.r3d_18", "segmentation.lraspp_mobilenet_v3_large"
            module = getattr(module, part)
        return getattr(module, name.rsplit(".", 1)[-1])(weights=None, **kwargs)
    return make


def _torchvision_class(path: str, **kwargs) -> Callable[[], nn.Module]:
    """A torchvision model class built smaller than its named variants (its own init code)."""
    def make():
        import importlib

        module, cls = path.rsplit(".", 1)
        return getattr(importlib.import_module(f"torchvision.models.{module}"), cls)(**kwargs)
    return make


def _timm(name: str, **kwargs) -> Callable[[], nn.Module]:
    def make():
        import timm
        return timm.create_model(name, pretrained=False, **kwargs)
    make.config_json = lambda: {"architecture": name, "model_args": kwargs}  # as timm's push_to_hub writes it
    return make


def _hf(model_cls: str, config_cls: str, **config) -> Callable[[], nn.Module]:
    def make():
        import transformers

        transformers.logging.set_verbosity_error()
        return getattr(transformers, model_cls)(getattr(transformers, config_cls)(**config))

    def config_json():
        import transformers
        return {**getattr(transformers, config_cls)(**config).to_dict(), "architectures": [model_cls]}
    make.config_json = config_json
    return make


def config_json(stock: Stock) -> dict | None:
    """The config.json a folder of `stock` carries (transformers, timm), as read from the file; None: no config."""
    import json

    make = getattr(stock.make, "config_json", None)
    return json.loads(json.dumps(make())) if make else None


# Small transformer shapes: few layers, narrow, with the family's own init.
_ENC = dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=4, intermediate_size=512)
_DEC = dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=4, intermediate_size=384, vocab_size=1000)
_BART = dict(d_model=128, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4,
             encoder_ffn_dim=256, decoder_ffn_dim=256, vocab_size=1000, max_position_embeddings=128)
_SPEECH = dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256,
               conv_dim=(64, 64, 64), conv_stride=(5, 2, 2), conv_kernel=(10, 3, 3), num_conv_pos_embeddings=16,
               num_conv_pos_embedding_groups=4, vocab_size=32)
_IMG = dict(image_size=32, patch_size=8, num_channels=3)

ZOO: tuple[Stock, ...] = (
    # ---------------------------------------------------------------- torchvision
    Stock("torchvision/resnet18", "cnn", _torchvision("resnet18")),
    Stock("torchvision/resnet50", "cnn", _torchvision("resnet50")),
    Stock("torchvision/squeezenet1_1", "cnn", _torchvision("squeezenet1_1")),
    Stock("torchvision/densenet", "cnn", _torchvision_class("densenet.DenseNet", block_config=(2, 3, 4, 3))),
    Stock("torchvision/googlenet", "cnn", _torchvision("googlenet", init_weights=True)),
    Stock("torchvision/mobilenet_v2", "cnn", _torchvision("mobilenet_v2")),
    Stock("torchvision/mobilenet_v3_small", "cnn", _torchvision("mobilenet_v3_small")),
    Stock("torchvision/mnasnet0_5", "cnn", _torchvision("mnasnet0_5")),
    Stock("torchvision/shufflenet_v2_x0_5", "cnn", _torchvision("shufflenet_v2_x0_5")),
    Stock("torchvision/efficientnet_b0", "cnn", _torchvision("efficientnet_b0")),
    Stock("torchvision/regnet_y_400mf", "cnn", _torchvision("regnet_y_400mf")),
    Stock("torchvision/convnext_tiny", "cnn", _torchvision("convnext_tiny")),
    Stock("torchvision/swin_t", "vit", _torchvision("swin_t")),
    Stock("torchvision/maxvit", "vit", _torchvision_class("maxvit.MaxVit", input_size=(224, 224), stem_channels=32,
                                                          partition_size=7, block_channels=[32, 64], block_layers=[1, 2],
                                                          head_dim=16, stochastic_depth_prob=0.0)),
    Stock("torchvision/vit", "vit", _torchvision_class("vision_transformer.VisionTransformer", image_size=64,
                                                       patch_size=16, num_layers=4, num_heads=4, hidden_dim=128,
                                                       mlp_dim=512, num_classes=10)),
    Stock("torchvision/r3d_18", "cnn", _torchvision("video.r3d_18")),
    Stock("torchvision/lraspp_mobilenet_v3_large", "cnn",
          _torchvision("segmentation.lraspp_mobilenet_v3_large", weights_backbone=None)),
    # ---------------------------------------------------------------- timm
    Stock("timm/vit_tiny_patch16_224", "vit", _timm("vit_tiny_patch16_224", depth=4)),
    Stock("timm/deit_tiny_distilled_patch16_224", "vit", _timm("deit_tiny_distilled_patch16_224", depth=4)),
    Stock("timm/eva02_tiny_patch14_224", "vit", _timm("eva02_tiny_patch14_224", depth=4)),
    Stock("timm/cait_xxs24_224", "vit", _timm("cait_xxs24_224", depth=4)),
    Stock("timm/xcit_nano_12_p16_224", "vit", _timm("xcit_nano_12_p16_224", depth=4)),
    Stock("timm/pvt_v2_b0", "vit", _timm("pvt_v2_b0")),
    Stock("timm/swin_tiny_patch4_window7_224", "vit", _timm("swin_tiny_patch4_window7_224", depths=(2, 2, 2, 2))),
    Stock("timm/mixer_s16_224", "mlp-mixer", _timm("mixer_s16_224")),
    Stock("timm/resmlp_12_224", "mlp-mixer", _timm("resmlp_12_224")),
    Stock("timm/gmlp_ti16_224", "mlp-mixer", _timm("gmlp_ti16_224")),
    Stock("timm/convnext_atto", "cnn", _timm("convnext_atto")),
    Stock("timm/efficientnet_b0", "cnn", _timm("efficientnet_b0")),
    Stock("timm/mobilenetv3_small_100", "cnn", _timm("mobilenetv3_small_100")),
    Stock("timm/resnet26d", "cnn", _timm("resnet26d")),
    Stock("timm/regnetx_002", "cnn", _timm("regnetx_002")),
    Stock("timm/ghostnet_100", "cnn", _timm("ghostnet_100")),
    Stock("timm/mobilevit_xxs", "vit", _timm("mobilevit_xxs")),
    Stock("timm/levit_128s", "vit", _timm("levit_128s")),
    Stock("timm/poolformer_s12", "cnn", _timm("poolformer_s12")),
    Stock("timm/edgenext_xx_small", "cnn", _timm("edgenext_xx_small")),
    Stock("timm/nf_regnet_b0", "cnn", _timm("nf_regnet_b0")),
    # ---------------------------------------------------------------- transformers: encoders
    Stock("transformers/bert", "encoder", _hf("BertForMaskedLM", "BertConfig", vocab_size=1000, **_ENC)),
    Stock("transformers/roberta", "encoder", _hf("RobertaForMaskedLM", "RobertaConfig", vocab_size=1000, **_ENC)),
    Stock("transformers/distilbert", "encoder", _hf("DistilBertForMaskedLM", "DistilBertConfig", vocab_size=1000, dim=128,
                                                    n_layers=2, n_heads=4, hidden_dim=512)),
    Stock("transformers/albert", "encoder", _hf("AlbertForMaskedLM", "AlbertConfig", vocab_size=1000, embedding_size=64,
                                                **_ENC)),
    Stock("transformers/electra", "encoder", _hf("ElectraForPreTraining", "ElectraConfig", vocab_size=1000,
                                                 embedding_size=64, **_ENC)),
    Stock("transformers/deberta_v2", "encoder", _hf("DebertaV2ForMaskedLM", "DebertaV2Config", vocab_size=1000, **_ENC)),
    # ---------------------------------------------------------------- transformers: decoders
    Stock("transformers/gpt2", "decoder", _hf("GPT2LMHeadModel", "GPT2Config", n_embd=128, n_layer=2, n_head=4,
                                              vocab_size=1000, n_positions=128)),
    Stock("transformers/gpt_neo", "decoder", _hf("GPTNeoForCausalLM", "GPTNeoConfig", hidden_size=128, num_layers=2,
                                                 attention_types=[[["global", "local"], 1]], num_heads=4,
                                                 vocab_size=1000, max_position_embeddings=128)),
    Stock("transformers/opt", "decoder", _hf("OPTForCausalLM", "OPTConfig", hidden_size=128, num_hidden_layers=2,
                                             num_attention_heads=4, ffn_dim=384, word_embed_proj_dim=128,
                                             vocab_size=1000, max_position_embeddings=128)),
    Stock("transformers/llama", "decoder", _hf("LlamaForCausalLM", "LlamaConfig", num_key_value_heads=2, **_DEC)),
    Stock("transformers/mistral", "decoder", _hf("MistralForCausalLM", "MistralConfig", num_key_value_heads=2, **_DEC)),
    Stock("transformers/qwen2", "decoder", _hf("Qwen2ForCausalLM", "Qwen2Config", num_key_value_heads=2, **_DEC)),
    Stock("transformers/gemma", "decoder", _hf("GemmaForCausalLM", "GemmaConfig", num_key_value_heads=2, head_dim=32,
                                               **_DEC)),
    Stock("transformers/phi", "decoder", _hf("PhiForCausalLM", "PhiConfig", **_DEC)),
    Stock("transformers/gpt_neox", "decoder", _hf("GPTNeoXForCausalLM", "GPTNeoXConfig", **_DEC)),
    Stock("transformers/bloom", "decoder", _hf("BloomForCausalLM", "BloomConfig", hidden_size=128, n_layer=2, n_head=4,
                                               vocab_size=1000)),
    Stock("transformers/falcon", "decoder", _hf("FalconForCausalLM", "FalconConfig", hidden_size=128,
                                                num_hidden_layers=2, num_attention_heads=4, vocab_size=1000)),
    # ---------------------------------------------------------------- transformers: state-space models
    Stock("transformers/mamba", "ssm", _hf("MambaForCausalLM", "MambaConfig", vocab_size=1000, hidden_size=128,
                                           state_size=16, num_hidden_layers=2, time_step_init_scheme="constant")),
    Stock("transformers/mamba2", "ssm", _hf("Mamba2ForCausalLM", "Mamba2Config", vocab_size=1000, hidden_size=128,
                                            state_size=16, num_hidden_layers=2, head_dim=16, num_heads=16, n_groups=1)),
    # ---------------------------------------------------------------- transformers: seq2seq
    Stock("transformers/t5", "seq2seq", _hf("T5ForConditionalGeneration", "T5Config", d_model=128, d_ff=256,
                                            num_layers=2, num_heads=4, d_kv=32, vocab_size=1000)),
    Stock("transformers/bart", "seq2seq", _hf("BartForConditionalGeneration", "BartConfig", **_BART)),
    Stock("transformers/marian", "seq2seq", _hf("MarianMTModel", "MarianConfig", pad_token_id=1, decoder_start_token_id=1, **_BART)),
    Stock("transformers/pegasus", "seq2seq", _hf("PegasusForConditionalGeneration", "PegasusConfig", **_BART)),
    # ---------------------------------------------------------------- transformers: speech
    Stock("transformers/whisper", "speech", _hf("WhisperForConditionalGeneration", "WhisperConfig", d_model=128,
                                                encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                                                decoder_attention_heads=4, encoder_ffn_dim=256, decoder_ffn_dim=256,
                                                vocab_size=1000, num_mel_bins=80, max_source_positions=64,
                                                max_target_positions=64, pad_token_id=0, bos_token_id=1,
                                                eos_token_id=2, decoder_start_token_id=1)),
    Stock("transformers/wav2vec2", "speech", _hf("Wav2Vec2ForCTC", "Wav2Vec2Config", **_SPEECH)),
    Stock("transformers/hubert", "speech", _hf("HubertForCTC", "HubertConfig", **_SPEECH)),
    # ---------------------------------------------------------------- transformers: vision
    Stock("transformers/vit", "vit", _hf("ViTForImageClassification", "ViTConfig", **_IMG, **_ENC)),
    Stock("transformers/swin", "vit", _hf("SwinForImageClassification", "SwinConfig", image_size=32, patch_size=2,
                                          embed_dim=32, depths=[2, 2], num_heads=[2, 4], window_size=4)),
    Stock("transformers/convnext", "cnn", _hf("ConvNextForImageClassification", "ConvNextConfig", hidden_sizes=[32, 64],
                                              depths=[2, 2], num_stages=2)),
    Stock("transformers/clip", "encoder", _hf("CLIPModel", "CLIPConfig",
                                              text_config=dict(vocab_size=1000, **_ENC),
                                              vision_config=dict(**_IMG, **_ENC))),
)


def build(stock: Stock) -> nn.Module:
    """The model at its library's default init (seeded), in eval mode, with the libraries' chatter silenced."""
    torch.manual_seed(0)
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        return stock.make().eval()


def export_input(stock: Stock) -> tuple[str, torch.Tensor] | None:
    """(argument name, example) to export `stock` to ONNX with; None where no single input drives it."""
    if stock.library in ("torchvision", "timm"):
        if "r3d" in stock.name:
            return "x", torch.randn(1, 3, 8, 112, 112)
        return "x", torch.randn(1, 3, 64, 64) if stock.name == "torchvision/vit" else torch.randn(1, 3, 224, 224)
    if stock.family in ("encoder", "decoder") and stock.name != "transformers/clip":
        return "input_ids", torch.randint(0, 500, (1, 8), generator=torch.Generator().manual_seed(0))
    if stock.name in ("transformers/vit", "transformers/swin", "transformers/convnext"):
        return "pixel_values", torch.randn(1, 3, 32, 32)
    return None


def save_all(model: nn.Module, folder: Path, hf: bool) -> dict[str, Path]:
    """The model's weights as users save them: `.pt` (state_dict), `.safetensors` and (transformers) an HF folder."""
    from safetensors.torch import save_model

    folder.mkdir(parents=True, exist_ok=True)
    paths = {"pt": folder / "model.pt", "safetensors": folder / "model.safetensors"}
    torch.save(model.state_dict(), paths["pt"])
    save_model(model, str(paths["safetensors"]), metadata={"format": "pt"})  # drops the second name of tied weights
    if hf:
        paths["hf"] = folder / "hf"
        from transformers.utils import logging

        logging.disable_progress_bar()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model.save_pretrained(paths["hf"])
    return paths
