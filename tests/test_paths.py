"""lrx.paths: leaf names of key paths and the attention/MLP selection of GaLore's recipe."""

import re

import flax.struct
import jax
import jax.numpy as jnp

from lrx.models import llama
from lrx.paths import ATTN_MLP, path_str


class _Node(flax.struct.PyTreeNode):
    inner: jax.Array


def test_path_str_names_dict_keys_sequence_indices_and_attributes():
    tree = {"layers_0": {"attn": [jnp.zeros(1), _Node(jnp.zeros(2))]}}
    names = [path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]
    assert names == ["layers_0/attn/0", "layers_0/attn/1/inner"]
    assert path_str(()) == ""


def test_attn_mlp_selects_exactly_the_llama_attention_and_mlp_kernels():
    cfg = llama.LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_heads=2,
                            num_layers=2, max_len=8)
    shapes = jax.eval_shape(lambda: llama.Llama(cfg).init(jax.random.key(0),
                                                          jnp.zeros((1, 8), jnp.int32)))
    names = [path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(shapes["params"])[0]]
    chosen = {n for n in names if re.fullmatch(ATTN_MLP, n)}
    expected = {n for n in names if len(n.split("/")) == 4 and n.split("/")[1] in ("attn", "mlp")
                and n.endswith("/kernel")}
    assert chosen == expected and len(chosen) == 2 * 7   # q, k, v, o + gate, up, down per layer
    assert not any("embed" in n or "norm" in n or "lm_head" in n for n in chosen)
