"""onnxruntime-genai's model builder on a Gemma 3 folder, with one compatibility shim (used by compare.py):

    python benchmarks/genai_build.py -i bundles/hf-270m -o OUT -p int4 -e cpu [--extra_options ...]

onnxruntime-genai 0.18's Gemma3Model reads the transformers 4 config spelling (`rope_local_base_freq`, a
flat `rope_parameters` with `rope_type`), while transformers 5, which the same builder needs (it imports
5.x-only classes), hands it per-layer-type `rope_parameters` ({"sliding_attention": ..., "full_attention":
...}), and the build stops with KeyError 'rope_type'. The shim gives the builder's config both spellings;
the model weights are loaded by transformers from the folder as usual.
"""

import runpy

import transformers

_from_pretrained = transformers.AutoConfig.from_pretrained


def _config(*args, **kwargs):
    config = _from_pretrained(*args, **kwargs)
    rope = getattr(config, "rope_parameters", None)
    if getattr(config, "model_type", "") == "gemma3_text" and isinstance(rope, dict) and "full_attention" in rope:
        config.rope_local_base_freq = rope["sliding_attention"]["rope_theta"]
        config.rope_theta = rope["full_attention"]["rope_theta"]
        config.rope_parameters = dict(rope["full_attention"])
    return config


transformers.AutoConfig.from_pretrained = _config
runpy.run_module("onnxruntime_genai.models.builder", run_name="__main__", alter_sys=True)
