"""A standalone speculative decoder (batch size 1) on transformers: the oracle.

Modes, all greedy: plain decoding, chain speculation (what vLLM 0.32 verifies) and
static-tree speculation (Medusa-style: top-k candidates per head, a tree mask, the
longest accepted path, and the KV cache compacted to that path). Output must equal
plain greedy decoding token for token; `tau` (tokens per target forward) is the
paper's mean accepted length.
"""

from __future__ import annotations

import heapq
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import AttentionInterface, AutoModelForCausalLM, DynamicCache
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from vllm_amphista.eval.tau import tau
from vllm_amphista.model.checkpoint import load_checkpoint
from vllm_amphista.model.draft_model import AmphistaDraftModel
from vllm_amphista.model.target import TargetWeights
from vllm_amphista.reference.tree import Path as TreePath
from vllm_amphista.reference.tree import TreeBuffers, build_tree, chain_tree

ATTENTION = "amphista_tree"
# The tree being verified right now, when the Triton kernel should compute its attention.
_kernel_tree: list[TreeBuffers | None] = [None]


def _tree_aware_attention(module, query, key, value, attention_mask, dropout=0.0,
                          scaling=None, **kwargs):
    """transformers attention: the Triton tree kernel while a tree is verified with the
    kernel on, PyTorch SDPA (given the 4D tree mask) otherwise. Same function either way:
    tree.tree_attention_reference defines both."""
    tree = _kernel_tree[0]
    if tree is None or query.shape[2] != tree.num_nodes:
        return sdpa_attention_forward(module, query, key, value, attention_mask,
                                      dropout=dropout, scaling=scaling, **kwargs)
    from vllm_amphista.kernels.triton_tree_attention import triton_tree_attention

    prefix = key.shape[2] - tree.num_nodes
    out = triton_tree_attention(query, key[:, :, :prefix], value[:, :, :prefix],
                                key[:, :, prefix:], value[:, :, prefix:], tree.mask)
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(ATTENTION, _tree_aware_attention)


@contextmanager
def _verifying(tree: TreeBuffers, use_kernel: bool):
    _kernel_tree[0] = tree if use_kernel else None
    try:
        yield
    finally:
        _kernel_tree[0] = None


@dataclass
class DecodeResult:
    tokens: list[int]
    target_forwards: int  # decoding forwards after the prefill
    accepted_per_step: list[int] = field(default_factory=list)  # tokens gained per forward
    seconds: float = 0.0

    @property
    def tau(self) -> float:
        """Mean tokens gained per decoding forward (the prefill's token not counted)."""
        steps = len(self.accepted_per_step)
        return tau(sum(self.accepted_per_step) - steps, steps)


class ReferenceDecoder:
    def __init__(self, target_dir: str | Path, heads: str | Path | AmphistaDraftModel | None,
                 dtype: torch.dtype = torch.float32, device: str = "cpu",
                 tree_kernel: bool | None = None) -> None:
        """tree_kernel: verify trees with the Triton kernel (default: on CUDA only; on CPU
        it needs TRITON_INTERPRET=1 and is for testing)."""
        self.device = torch.device(device)
        self.tree_kernel = self.device.type == "cuda" if tree_kernel is None else tree_kernel
        self.target = AutoModelForCausalLM.from_pretrained(
            str(target_dir), dtype=dtype, attn_implementation=ATTENTION).to(self.device).eval()
        weights = TargetWeights.from_hf_model(self.target, name=Path(target_dir).name)
        if isinstance(heads, AmphistaDraftModel):
            self.draft = heads
        elif heads is not None:
            self.draft = load_checkpoint(heads, target=weights, dtype=dtype)
        else:
            self.draft = None
        if self.draft is not None:
            self.draft.to(self.device)

    # -- target passes ---------------------------------------------------------------
    def _forward(self, tokens: torch.Tensor, cache: DynamicCache, positions: torch.Tensor,
                 mask: torch.Tensor | None = None):
        out = self.target(tokens[None].to(self.device), past_key_values=cache,
                          position_ids=positions[None].to(self.device), attention_mask=mask,
                          use_cache=True, output_hidden_states=True)
        return out.logits[0].float(), out.hidden_states[-1][0]

    @torch.no_grad()
    def plain(self, prompt: list[int], max_new_tokens: int, eos: int | None = None
              ) -> DecodeResult:
        start = time.perf_counter()
        cache = DynamicCache(config=self.target.config)
        logits, _ = self._forward(torch.tensor(prompt), cache, torch.arange(len(prompt)))
        tokens = [int(logits[-1].argmax())]
        forwards = 0
        while len(tokens) < max_new_tokens and tokens[-1] != eos:
            position = torch.tensor([len(prompt) + len(tokens) - 1])
            logits, _ = self._forward(torch.tensor(tokens[-1:]), cache, position)
            tokens.append(int(logits[-1].argmax()))
            forwards += 1
        return DecodeResult(tokens, forwards, [1] * forwards, time.perf_counter() - start)

    @torch.no_grad()
    def speculative(self, prompt: list[int], max_new_tokens: int, tree: TreeBuffers,
                    eos: int | None = None) -> DecodeResult:
        """Greedy speculative decoding over a static tree (a chain is a 1-wide tree)."""
        if self.draft is None:
            raise ValueError("speculative decoding needs heads")
        depth = int(tree.depths.max())
        if depth > self.draft.config.num_heads:
            raise ValueError(f"tree depth {depth} exceeds the {self.draft.config.num_heads} heads")
        start = time.perf_counter()
        cache, sal = DynamicCache(config=self.target.config), self.draft.new_cache()
        prompt_t = torch.tensor(prompt)
        logits, hidden = self._forward(prompt_t, cache, torch.arange(len(prompt)))
        tokens = [int(logits[-1].argmax())]
        draft_logits = self.draft.extend(
            sal, hidden,
            torch.cat((prompt_t[1:], torch.tensor(tokens))).to(self.device), [len(prompt)])
        mask_rows = tree.mask.to(self.device)
        result = DecodeResult([], 0)
        while len(tokens) < max_new_tokens and tokens[-1] != eos:
            length = len(prompt) + len(tokens) - 1  # tokens[-1] is not in the KV cache yet
            # Candidates: [root, head 1 top-k, head 2 top-k, ...] -> tree tokens.
            top = self.draft.to_target_ids(draft_logits[0, :depth].topk(tree.top_k, -1).indices)
            candidates = torch.cat((torch.tensor(tokens[-1:], device=self.device),
                                    top.flatten()))
            tree_tokens = candidates[tree.candidate_index.to(self.device)]
            visible = torch.cat((mask_rows.new_ones(tree.num_nodes, length), mask_rows), 1)
            mask = torch.zeros(visible.shape, dtype=self.target.dtype, device=self.device)
            mask = mask.masked_fill(~visible, torch.finfo(mask.dtype).min)[None, None]
            with _verifying(tree, self.tree_kernel):
                logits, hidden = self._forward(tree_tokens, cache, length + tree.depths, mask)
            greedy = logits.argmax(-1)
            path, accepted = self._longest_path(tree, tree_tokens, greedy)
            new_tokens = [int(tree_tokens[n]) for n in path[1: accepted + 1]]
            new_tokens.append(int(greedy[path[accepted]]))
            self._compact(cache, length, path[: accepted + 1])
            kept = torch.tensor(path[: accepted + 1], device=self.device)
            next_tokens = torch.tensor(new_tokens, device=self.device)
            draft_logits = self.draft.extend(sal, hidden[kept], next_tokens,
                                             [len(new_tokens)])
            tokens.extend(new_tokens)
            result.target_forwards += 1
            result.accepted_per_step.append(len(new_tokens))
        if eos in tokens:
            tokens = tokens[: tokens.index(eos) + 1]
        result.tokens = tokens[:max_new_tokens]
        result.seconds = time.perf_counter() - start
        return result

    @staticmethod
    def _longest_path(tree: TreeBuffers, tree_tokens, greedy) -> tuple[list[int], int]:
        """The leaf path whose drafted tokens the target confirms longest."""
        best_path, best = [0], 0
        for row in tree.retrieve.tolist():
            path = [n for n in row if n >= 0]
            accepted = 0
            while (accepted + 1 < len(path)
                   and int(tree_tokens[path[accepted + 1]]) == int(greedy[path[accepted]])):
                accepted += 1
            if accepted > best:
                best_path, best = path, accepted
        return best_path, best

    @staticmethod
    def _compact(cache: DynamicCache, length: int, kept_nodes: list[int]) -> None:
        """Keep the prefix and the accepted path's entries; drop the rest of the tree."""
        keep = torch.cat((torch.arange(length), length + torch.tensor(kept_nodes)))
        for layer in cache.layers:
            index = keep.to(layer.keys.device)
            layer.keys = layer.keys.index_select(2, index)
            layer.values = layer.values.index_select(2, index)


def best_tree(acceptance: list[list[float]], num_nodes: int) -> list[TreePath]:
    """The tree of `num_nodes` paths maximising expected accepted length, Medusa's greedy
    construction: acceptance[k][i] is the rate at which head k's i-th candidate is the
    target's token; a node's value is the product of rates along its path, and the best
    node whose parent is already in the tree is added next."""
    heap = [(-rate, (i,)) for i, rate in enumerate(acceptance[0])]
    heapq.heapify(heap)
    paths: list[TreePath] = []
    while heap and len(paths) < num_nodes:
        negative, path = heapq.heappop(heap)
        paths.append(path)
        if len(path) < len(acceptance):
            for i, rate in enumerate(acceptance[len(path)]):
                heapq.heappush(heap, (negative * rate, (*path, i)))
    return paths


def chain(depth: int) -> TreeBuffers:
    return build_tree(chain_tree(depth), top_k=1)
