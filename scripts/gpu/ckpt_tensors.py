"""Shared by the issue #15 scripts: a quantized tensor of a checkpoint, loaded with mx.load from
the safetensors shard that holds it (model.safetensors.index.json when there is one)."""
import json
import os

import mlx.core as mx

_shards = {}


def quantized(ckpt, prefix):
    """(weight, scales, biases) of the quantized tensor `prefix` (e.g.
    model.layers.0.mlp.switch_mlp.down_proj), each shard loaded once."""
    index_file = os.path.join(ckpt, "model.safetensors.index.json")
    name = (json.load(open(index_file))["weight_map"][prefix + ".weight"] if os.path.exists(index_file)
            else "model.safetensors")
    path = os.path.join(ckpt, name)
    if path not in _shards:
        _shards[path] = mx.load(path)
    return tuple(_shards[path][f"{prefix}.{p}"] for p in ("weight", "scales", "biases"))
