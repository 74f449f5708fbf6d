#!/usr/bin/env python3
"""Independent numpy forward pass for Llama-family GGUF models: the truth for ebb's logits.

Why this exists: ebb's engine and kernels are checked against something ebb did not compute.
This file shares no code with ebb. It reads the GGUF with the `gguf` package (GGUFReader for
metadata and tensor bytes, gguf.quants.dequantize for the quantized blocks) and runs the model
with plain numpy, written for clarity rather than speed.

Design and trade-offs:
  - Every weight is dequantized once at load time into a float64 matrix, and the whole forward
    pass runs in float64. That costs ~8 bytes per parameter (about 1.1 GB for the 135M default
    model), which is fine for the small models the tests use and makes rounding in this file
    negligible next to ebb's float32 (or int8-activation) arithmetic. So any difference the tests
    see is ebb's, not ours. Logits are returned as float32.
  - The dequantized weights are exactly what the file stores; we do NOT imitate llama.cpp's habit
    of quantizing activations to 8 bits before a quantized matmul. A fast engine that does that
    will differ from this reference by a small, explainable amount (see test_logits.py).
  - A simple per-layer KV cache lets greedy generation cost one token per step instead of
    recomputing the whole prefix.

The graph (llama.cpp's "llama" architecture, which SmolLM, Llama 2/3, Mistral follow):
    x = token_embd[ids]
    for each layer:
        h = rmsnorm(x) * attn_norm
        q, k, v = h Wq^T, h Wk^T, h Wv^T          (+ optional biases, as Qwen2 has)
        rotate q and k by position (RoPE)
        causal softmax(q k^T / sqrt(head_dim)) v, query head j reading kv head j // (n_head/n_kv)
        x += attn Wo^T
        h = rmsnorm(x) * ffn_norm
        x += (silu(h Wgate^T) * (h Wup^T)) Wdown^T    (SwiGLU)
    logits = (rmsnorm(x) * output_norm) Wout^T       (Wout = token_embd when output.weight is absent)

RoPE: GGUF files converted from Hugging Face llama checkpoints store Q and K rows already permuted
so that the "normal" rotation applies: pairs (x[2i], x[2i+1]) of the first n_rot dimensions of a
head rotate by angle pos * base^(-2i/n_rot). Architectures that llama.cpp runs with "neox" rope
(Qwen2) rotate pairs (x[i], x[i + n_rot/2]) instead; see ROPE_STYLE.

CLI for manual use:
    python reference.py MODEL --ids 1,2,3 [--greedy N]
    python reference.py MODEL --text "The capital of France is" --greedy 20
    python reference.py MODEL --chat "What is the capital of France?" --greedy 40
    python reference.py MODEL --ppl TEXTFILE --ctx 512 --chunks 4
"""

import argparse
import sys

import numpy as np

import gguf

# Architectures whose llama.cpp graph is the one below, with their rope pairing: "normal" rotates
# (x[2i], x[2i+1]), "neox" rotates (x[i], x[i + n_rot/2]). Mistral and SmolLM GGUFs say "llama".
ROPE_STYLE = {"llama": "normal", "qwen2": "neox"}


# ---------------------------------------------------------------------------------------------
# GGUF reading
# ---------------------------------------------------------------------------------------------

def field_value(reader, key, default=None):
    """Return a metadata value (scalar, string or list), or default when the key is absent."""
    field = reader.fields.get(key)
    if field is None:
        return default
    return field.contents()


class Config:
    """Hyper-parameters read from GGUF metadata under the architecture's own prefix."""

    def __init__(self, reader):
        arch = field_value(reader, "general.architecture")
        if arch is None:
            raise ValueError("GGUF has no general.architecture")
        self.arch = arch
        if arch not in ROPE_STYLE:
            raise ValueError(f"architecture '{arch}' is not implemented by the reference "
                             f"(known: {', '.join(sorted(ROPE_STYLE))})")

        def need(key):
            value = field_value(reader, f"{arch}.{key}")
            if value is None:
                raise ValueError(f"GGUF lacks {arch}.{key}")
            return value

        self.n_layer = int(need("block_count"))
        self.n_embd = int(need("embedding_length"))
        self.n_ff = int(need("feed_forward_length"))
        self.n_head = int(need("attention.head_count"))
        self.n_head_kv = int(field_value(reader, f"{arch}.attention.head_count_kv", self.n_head))
        self.head_dim = int(field_value(reader, f"{arch}.attention.key_length",
                                        self.n_embd // self.n_head))
        self.n_rot = int(field_value(reader, f"{arch}.rope.dimension_count", self.head_dim))
        self.rope_base = float(field_value(reader, f"{arch}.rope.freq_base", 10000.0))
        self.rms_eps = float(field_value(reader, f"{arch}.attention.layer_norm_rms_epsilon", 1e-5))
        self.rope_neox = ROPE_STYLE[arch] == "neox"
        scaling = field_value(reader, f"{arch}.rope.scaling.type", "none")
        self.rope_pos_scale = 1.0
        if scaling == "linear":
            self.rope_pos_scale = 1.0 / float(field_value(reader, f"{arch}.rope.scaling.factor", 1.0))
        elif scaling not in ("none", None):
            raise ValueError(f"rope scaling '{scaling}' is not implemented by the reference")
        if self.n_head % self.n_head_kv:
            raise ValueError("head_count is not a multiple of head_count_kv")
        if self.n_rot % 2 or self.n_rot > self.head_dim:
            raise ValueError(f"bad rope dimension count {self.n_rot}")

    def __repr__(self):
        return ", ".join(f"{k}={v}" for k, v in vars(self).items())


class Model:
    """All weights of a Llama-family GGUF, dequantized to float64 numpy arrays."""

    def __init__(self, path):
        self.path = path
        reader = gguf.GGUFReader(path)
        self.reader = reader
        self.cfg = Config(reader)
        self.tensors = {t.name: t for t in reader.tensors}
        c = self.cfg

        self.tok_embd = self.weight("token_embd.weight")
        self.n_vocab = self.tok_embd.shape[0]
        self.out_norm = self.weight("output_norm.weight")
        # Tied embeddings: no output.weight means the output projection reuses token_embd.
        self.output = self.weight("output.weight") if "output.weight" in self.tensors else self.tok_embd
        self.freq_factors = (self.weight("rope_freqs.weight")
                             if "rope_freqs.weight" in self.tensors else None)

        self.layers = []
        for i in range(c.n_layer):
            p = f"blk.{i}."
            layer = {name: self.weight(p + name + ".weight")
                     for name in ("attn_norm", "attn_q", "attn_k", "attn_v", "attn_output",
                                  "ffn_norm", "ffn_gate", "ffn_up", "ffn_down")}
            for name in ("attn_q", "attn_k", "attn_v"):
                bias = p + name + ".bias"
                layer[name + ".bias"] = self.weight(bias) if bias in self.tensors else None
            self.layers.append(layer)
        self.check_shapes()

    def weight(self, name):
        """Dequantize one tensor to float64, shaped [rows, cols] = [ne1, ne0] (or [ne0] for 1-D)."""
        t = self.tensors.get(name)
        if t is None:
            raise ValueError(f"{self.path}: missing tensor {name}")
        data = gguf.quants.dequantize(t.data, t.tensor_type)
        dims = [int(d) for d in reversed(t.shape)]
        return np.asarray(data, dtype=np.float64).reshape(dims)

    def check_shapes(self):
        c = self.cfg
        q_dim, kv_dim = c.n_head * c.head_dim, c.n_head_kv * c.head_dim
        expect = {"attn_q": (q_dim, c.n_embd), "attn_k": (kv_dim, c.n_embd),
                  "attn_v": (kv_dim, c.n_embd), "attn_output": (c.n_embd, q_dim),
                  "ffn_gate": (c.n_ff, c.n_embd), "ffn_up": (c.n_ff, c.n_embd),
                  "ffn_down": (c.n_embd, c.n_ff)}
        for i, layer in enumerate(self.layers):
            for name, shape in expect.items():
                if layer[name].shape != shape:
                    raise ValueError(f"blk.{i}.{name}: shape {layer[name].shape}, expected {shape}")
        if self.output.shape != (self.n_vocab, c.n_embd):
            raise ValueError(f"output projection shape {self.output.shape}")


# ---------------------------------------------------------------------------------------------
# The forward pass
# ---------------------------------------------------------------------------------------------

def rmsnorm(x, weight, eps):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * weight


def silu(x):
    return x / (1.0 + np.exp(-x))


def rope_angles(cfg, positions, freq_factors):
    """Angles [n_tok, n_rot/2]: pos * base^(-2i/n_rot) (divided by per-frequency factors if any)."""
    i = np.arange(cfg.n_rot // 2, dtype=np.float64)
    inv_freq = cfg.rope_base ** (-2.0 * i / cfg.n_rot)
    if freq_factors is not None:
        inv_freq = inv_freq / freq_factors
    pos = np.asarray(positions, dtype=np.float64) * cfg.rope_pos_scale
    return pos[:, None] * inv_freq[None, :]


def apply_rope(x, angles, cfg):
    """Rotate the first n_rot dims of every head of x [n_tok, n_heads, head_dim] (a new array)."""
    out = x.copy()
    cos = np.cos(angles)[:, None, :]
    sin = np.sin(angles)[:, None, :]
    half = cfg.n_rot // 2
    if cfg.rope_neox:
        a, b = x[..., :half], x[..., half:cfg.n_rot]
        out[..., :half] = a * cos - b * sin
        out[..., half:cfg.n_rot] = a * sin + b * cos
    else:
        a, b = x[..., 0:cfg.n_rot:2], x[..., 1:cfg.n_rot:2]
        out[..., 0:cfg.n_rot:2] = a * cos - b * sin
        out[..., 1:cfg.n_rot:2] = a * sin + b * cos
    return out


class Cache:
    """Keys (already rotated) and values of every processed position, per layer."""

    def __init__(self, cfg):
        shape = (0, cfg.n_head_kv, cfg.head_dim)
        self.k = [np.zeros(shape) for _ in range(cfg.n_layer)]
        self.v = [np.zeros(shape) for _ in range(cfg.n_layer)]

    @property
    def length(self):
        return self.k[0].shape[0]


def attention(q, k, v, first_pos, cfg):
    """Causal grouped-query attention. q [n, H, d] at positions first_pos.., k/v [T, KV, d]."""
    n, total = q.shape[0], k.shape[0]
    group = cfg.n_head // cfg.n_head_kv
    # Expand kv heads so that query head j reads kv head j // group.
    # Head-major contiguous copies so that the batched matmuls below go to BLAS (einsum or
    # strided views would fall back to slow loops).
    qh = np.ascontiguousarray(q.transpose(1, 0, 2))                            # [H, n, d]
    kh = np.ascontiguousarray(np.repeat(k, group, axis=1).transpose(1, 2, 0))  # [H, d, T]
    vh = np.ascontiguousarray(np.repeat(v, group, axis=1).transpose(1, 0, 2))  # [H, T, d]
    scores = qh @ kh / np.sqrt(cfg.head_dim)                                   # [H, n, T]
    q_pos = first_pos + np.arange(n)
    mask = np.arange(total)[None, :] > q_pos[:, None]          # [n, T]: future positions
    scores = np.where(mask[None, :, :], -np.inf, scores)
    scores -= scores.max(axis=-1, keepdims=True)
    probs = np.exp(scores)
    probs /= probs.sum(axis=-1, keepdims=True)
    return (probs @ vh).transpose(1, 0, 2)                                     # [n, H, d]


def forward(model, ids, cache=None, logits_for="all"):
    """Run new tokens `ids` after what `cache` holds. Returns float64 logits.

    logits_for: "all" -> [n_tok, n_vocab]; "last" -> [1, n_vocab] (saves the big projection);
    "hidden" -> the head's input for every token, rmsnorm(x) * output_norm [n_tok, n_embd]."""
    cfg = model.cfg
    ids = np.asarray(ids, dtype=np.int64)
    if ids.ndim != 1 or ids.size == 0:
        raise ValueError("ids must be a non-empty 1-D list")
    if ids.min() < 0 or ids.max() >= model.n_vocab:
        raise ValueError(f"token id out of range [0, {model.n_vocab})")
    if cache is None:
        cache = Cache(cfg)
    n = ids.size
    first = cache.length
    angles = rope_angles(cfg, np.arange(first, first + n), model.freq_factors)

    x = model.tok_embd[ids]
    for li, L in enumerate(model.layers):
        h = rmsnorm(x, L["attn_norm"], cfg.rms_eps)
        q, k, v = h @ L["attn_q"].T, h @ L["attn_k"].T, h @ L["attn_v"].T
        for name, t in (("attn_q", q), ("attn_k", k), ("attn_v", v)):
            if L[name + ".bias"] is not None:
                t += L[name + ".bias"]
        q = apply_rope(q.reshape(n, cfg.n_head, cfg.head_dim), angles, cfg)
        k = apply_rope(k.reshape(n, cfg.n_head_kv, cfg.head_dim), angles, cfg)
        v = v.reshape(n, cfg.n_head_kv, cfg.head_dim)
        cache.k[li] = np.concatenate([cache.k[li], k])
        cache.v[li] = np.concatenate([cache.v[li], v])
        att = attention(q, cache.k[li], cache.v[li], first, cfg)
        x = x + att.reshape(n, cfg.n_head * cfg.head_dim) @ L["attn_output"].T
        h = rmsnorm(x, L["ffn_norm"], cfg.rms_eps)
        x = x + (silu(h @ L["ffn_gate"].T) * (h @ L["ffn_up"].T)) @ L["ffn_down"].T

    if logits_for == "last":
        x = x[-1:]
    h = rmsnorm(x, model.out_norm, cfg.rms_eps)
    return h if logits_for == "hidden" else h @ model.output.T


def embedding(model, ids):
    """The mean of the tokens' final hidden states, scaled to unit length (what /v1/embeddings
    documents)."""
    m = forward(model, ids, logits_for="hidden").mean(axis=0)
    return m / np.linalg.norm(m)


def logits(model, ids):
    """Logits for every position of `ids`: float32 array [n_tok, n_vocab]."""
    return forward(model, ids).astype(np.float32)


def greedy(model, ids, n_new, stop_ids=()):
    """Greedy continuation (argmax each step, lowest id on an exact tie). Returns the new ids."""
    cache = Cache(model.cfg)
    out = []
    last = forward(model, ids, cache, logits_for="last")[0]
    for _ in range(n_new):
        tok = int(np.argmax(last))
        out.append(tok)
        if tok in stop_ids:
            break
        last = forward(model, [tok], cache, logits_for="last")[0]
    return out


def perplexity(model, ids, n_ctx=512, n_chunks=None):
    """Perplexity scored the way llama.cpp's llama-perplexity scores it (no BOS handling here:
    for models with add_bos_token=true the caller puts BOS first in every window itself).

    The ids are cut into floor(len/n_ctx) windows (or the first n_chunks), each run from an empty
    cache at positions 0..n_ctx-1. Only the second half is scored: logits at positions
    n_ctx/2 .. n_ctx-2 predict the tokens at n_ctx/2+1 .. n_ctx-1, i.e. n_ctx - n_ctx/2 - 1
    tokens per window. Result: exp(mean negative log-likelihood over all scored tokens)."""
    n_total = len(ids) // n_ctx
    n = n_total if n_chunks is None else min(n_chunks, n_total)
    if n < 1:
        raise ValueError(f"need at least {n_ctx} tokens")
    first = n_ctx // 2
    nll, count = 0.0, 0
    for c in range(n):
        window = ids[c * n_ctx:(c + 1) * n_ctx]
        out = forward(model, window)[first:n_ctx - 1]
        out = out - out.max(axis=1, keepdims=True)
        logp = out - np.log(np.exp(out).sum(axis=1, keepdims=True))
        targets = np.asarray(window[first + 1:n_ctx])
        nll -= logp[np.arange(len(targets)), targets].sum()
        count += len(targets)
    return float(np.exp(nll / count)), count


# ---------------------------------------------------------------------------------------------
# Tokenizer: Hugging Face `tokenizers` built from the GGUF vocabulary (gpt2-style BPE only)
# ---------------------------------------------------------------------------------------------

def hf_tokenizer(reader):
    """Byte-level BPE tokenizer from GGUF tokens/merges, with special tokens as added tokens.

    Pre-tokenization follows llama.cpp's table for the file's tokenizer.ggml.pre: "smollm" (and
    friends) split every digit on its own before the GPT-2 regex; plain "gpt2"/"default" do not."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    if field_value(reader, "tokenizer.ggml.model") != "gpt2":
        raise ValueError("reference tokenizer only supports gpt2-style BPE vocabularies")
    tokens = field_value(reader, "tokenizer.ggml.tokens")
    types = field_value(reader, "tokenizer.ggml.token_type")
    merges = [tuple(m.split(" ", 1)) for m in field_value(reader, "tokenizer.ggml.merges")]
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
    pre = field_value(reader, "tokenizer.ggml.pre", "default")
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in ("smollm", "codeshell", "exaone", "minerva"):
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), byte_level])
    elif pre in ("gpt2", "default", "mpt", "olmo"):
        tok.pre_tokenizer = byte_level
    else:
        raise ValueError(f"reference tokenizer does not know pre-tokenizer '{pre}'")
    tok.decoder = decoders.ByteLevel()
    # Control (3) and user-defined (4) tokens match as whole strings, like llama.cpp's specials.
    specials = [AddedToken(tokens[i], special=True, normalized=False)
                for i, ty in enumerate(types) if ty in (3, 4)]
    tok.add_special_tokens(specials)
    return tok


def chat_prompt(user_text):
    """ChatML prompt with SmolLM2's default system line (as its chat template writes it)."""
    return ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by "
            "Hugging Face<|im_end|>\n<|im_start|>user\n" + user_text +
            "<|im_end|>\n<|im_start|>assistant\n")


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------

def main(argv=None):
    ap = argparse.ArgumentParser(description="numpy reference forward pass for a Llama-family GGUF")
    ap.add_argument("model")
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--ids", help="comma- or space-separated token ids")
    src.add_argument("--text", help="plain text, tokenized with the GGUF vocabulary")
    src.add_argument("--chat", help="a user message wrapped in the ChatML template")
    src.add_argument("--ppl", metavar="FILE", help="perplexity of a text file, llama-perplexity's way")
    ap.add_argument("--ctx", type=int, default=512, help="--ppl window (default 512)")
    ap.add_argument("--chunks", type=int, default=None, help="--ppl: only the first N windows")
    ap.add_argument("--greedy", type=int, default=0, metavar="N", help="generate N tokens greedily")
    ap.add_argument("--top", type=int, default=5, help="show the top K logits at the last position")
    ap.add_argument("--save", help="write float32 logits of all positions here (raw, row-major)")
    args = ap.parse_args(argv)

    model = Model(args.model)
    print(f"config: {model.cfg}, n_vocab={model.n_vocab}", file=sys.stderr)
    tok = None
    if args.ppl is not None:
        text = open(args.ppl, encoding="utf-8").read()
        if text.endswith("\n"):
            text = text[:-1]  # llama-perplexity's -f drops one trailing newline
        ids = hf_tokenizer(model.reader).encode(text).ids
        ppl, count = perplexity(model, ids, args.ctx, args.chunks)
        print(f"tokens={len(ids)} ctx={args.ctx} scored={count} ppl={ppl:.4f}")
        return 0
    if args.ids is not None:
        ids = [int(s) for s in args.ids.replace(",", " ").split()]
    else:
        tok = hf_tokenizer(model.reader)
        ids = tok.encode(args.text if args.text is not None else chat_prompt(args.chat)).ids
    print("ids:", " ".join(map(str, ids)))

    out = logits(model, ids)
    if args.save:
        out.tofile(args.save)
    last = out[-1]
    order = np.argsort(-last, kind="stable")[:args.top]
    print("top at last position:", ", ".join(f"{i}:{last[i]:.4f}" for i in order))
    if args.greedy:
        eos = field_value(model.reader, "tokenizer.ggml.eos_token_id")
        stop = () if eos is None else (int(eos),)
        new = greedy(model, ids, args.greedy, stop)
        print("greedy:", " ".join(map(str, new)))
        if tok is None:
            try:
                tok = hf_tokenizer(model.reader)
            except ValueError:
                tok = None
        if tok is not None:
            print("text:", repr(tok.decode(new, skip_special_tokens=False)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
