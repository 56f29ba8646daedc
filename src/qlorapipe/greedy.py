"""Greedy generation from token-id prompts in left-padded batches (evaluate's answers and samples,
merge's speed, export's references).

A 4-bit model with adapters generates one token per forward pass, and on a GPU (or the CPU's
dequantizing 4-bit path) a pass costs about as much for a batch as for one prompt: batching the
prompts divides the passes by the batch size. Prompts of similar length go together (less
padding); positions follow the attention mask, so a padded prompt gets the tokens it gets alone
(tests compare the two).

On a GPU a decoding step of a 4-bit model is a thousand small kernels launched from Python, and
transformers' ``generate`` spends most of each step on the CPU. There the ``Decoder`` below keeps
the keys and values in tensors allocated once (a static cache), passes the attention mask itself,
and records one step as a CUDA graph: every later token is one graph replay, the chosen token, its
position and the stop flags updated on the GPU without a round trip to Python. On the CPU, and for
architectures it does not know, transformers' ``generate`` runs as before; a test holds the two to
the same tokens.
"""

from __future__ import annotations

import contextlib
import logging

log = logging.getLogger(__name__)

# Decoder-only families whose attention reads the cache through ``update`` and takes a 4-D mask as given
# (every layer full attention): the static decoder's own cache and mask are all they need.
STATIC_FAMILIES = ("llama", "qwen2")
BASE = "__base__"  # peft's name for "no adapter" in a mixed-adapter batch


def stop_token_ids(model, tokenizer) -> set[int]:
    """The tokens that end generation: the generation config's EOS ids (end of turn included) and the tokenizer's."""
    ids = set()
    config = getattr(model, "generation_config", None)
    eos = getattr(config, "eos_token_id", None)
    for value in eos if isinstance(eos, list) else [eos]:
        if value is not None:
            ids.add(int(value))
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    return ids


def generate(model, prompts: list[list[int]], max_new_tokens: int, batch_size: int, device, stop_ids: set[int],
             pad_id: int | None, advance=None, adapter_names: list[str] | None = None,
             static: bool | None = None) -> list[list[int]]:
    """The new tokens of each prompt's greedy continuation, in the prompts' order: up to ``max_new_tokens``,
    ending with padding after a stop token when a row stopped before the others.

    Args:
        pad_id: the id that fills the left of shorter prompts (None: the smallest stop id).
        advance: called with the number of prompts done after each batch (progress).
        adapter_names: for a peft model, the adapter each prompt runs with (``"__base__"``: none), so
            base and fine-tuned answers share the batches (peft's mixed-adapter batches; on the GPU's
            static decoder, one batch per adapter).
        static: decode with ``Decoder`` (True) or transformers' ``generate`` (False); None: ``uses_static_decoder``.
    """
    import torch

    pad = pad_id if pad_id is not None else min(stop_ids, default=0)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    new_tokens: list[list[int]] = [[] for _ in prompts]
    static = uses_static_decoder(model, device) if static is None else static
    model.eval()
    for first in range(0, len(order), batch_size):
        batch = order[first : first + batch_size]
        names = None if adapter_names is None else [adapter_names[i] for i in batch]
        groups = [(batch, names)]
        if static and names is not None:  # peft's mixed batches index rows from Python lists: not a graph
            groups = [([i for i, n in zip(batch, names) if n == name], name) for name in dict.fromkeys(names)]
        for rows, name in groups:
            input_ids, attention = left_padded([prompts[i] for i in rows], pad)
            with torch.no_grad():
                if static:
                    with _adapter(model, name):
                        decoder = Decoder(model, len(rows), input_ids.shape[1], max_new_tokens, stop_ids, pad,
                                          torch.device(device))
                        try:
                            generated = decoder.run(input_ids, attention)
                        finally:
                            decoder.close()
                else:
                    mixed = {} if name is None else {"adapter_names": name}
                    generated = model.generate(input_ids=input_ids.to(device), attention_mask=attention.to(device),
                                               max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad,
                                               eos_token_id=sorted(stop_ids) or None, use_cache=True,
                                               **mixed)[:, input_ids.shape[1]:]
            for row, i in enumerate(rows):
                new_tokens[i] = generated[row].tolist()
        if advance is not None:
            advance(len(batch))
    return new_tokens


def left_padded(prompts: list[list[int]], pad: int):
    """(input_ids, attention_mask) of the prompts, padded on the left to the longest."""
    import torch

    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    attention = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        input_ids[row, width - len(prompt):] = torch.tensor(prompt)
        attention[row, width - len(prompt):] = 1
    return input_ids, attention


def uses_static_decoder(model, device) -> bool:
    """Whether ``generate`` decodes with the static-cache ``Decoder`` (CUDA graphs): on a GPU, when
    ``static_refusal`` finds nothing against it."""
    import torch

    return torch.device(device).type == "cuda" and static_refusal(model, torch.device(device)) is None


# Generation-config entries whose logits processors transformers' greedy search would apply and the
# Decoder does not (it applies repetition_penalty): with any of them set, generate runs instead.
_UNSUPPORTED_PROCESSORS = ("sequence_bias", "bad_words_ids", "forced_bos_token_id", "forced_eos_token_id",
                           "exponential_decay_length_penalty", "suppress_tokens", "begin_suppress_tokens")
_UNSUPPORTED_IF_POSITIVE = ("no_repeat_ngram_size", "min_length", "min_new_tokens")


def static_refusal(model, device) -> str | None:
    """Why the ``Decoder`` would not choose the tokens transformers' ``generate`` chooses for this model
    on ``device`` (None: it would): a family outside STATIC_FAMILIES or with a sliding window, attention
    other than sdpa (eager attention adds a mask, it would read a boolean one as numbers), a weight off
    ``device`` (a module streamed from the CPU copies its weights over at each forward: no graph holds
    that), or a generation config asking for a logits processor it does not apply."""
    config = getattr(model, "config", None)
    if getattr(config, "model_type", None) not in STATIC_FAMILIES:
        return f"model type {getattr(config, 'model_type', None)}"
    if getattr(config, "use_sliding_window", False):
        return "sliding-window attention"
    if getattr(config, "_attn_implementation", None) != "sdpa":
        return f"attention {getattr(config, '_attn_implementation', None)}"
    if any(p.device.type != device.type for p in model.parameters()):
        return "weights off the device"
    generation = getattr(model, "generation_config", None)
    for key in _UNSUPPORTED_PROCESSORS:
        if getattr(generation, key, None) is not None:
            return f"generation config {key}"
    for key in _UNSUPPORTED_IF_POSITIVE:
        if (getattr(generation, key, None) or 0) > 0:
            return f"generation config {key}"
    if getattr(generation, "remove_invalid_values", False) or getattr(generation, "guidance_scale", None) not in (
            None, 1, 1.0):
        return "generation config remove_invalid_values or guidance_scale"
    return None


@contextlib.contextmanager
def _adapter(model, name: str | None):
    """Run a peft model with adapter ``name`` (``"__base__"``: none); None: as it is."""
    if name is None:
        yield
    elif name == BASE:
        with model.disable_adapter():
            yield
    elif name == model.active_adapter:
        yield
    else:  # peft's set_adapter makes the adapter it activates trainable: the flags are put back after
        active = model.active_adapter
        trainable = {parameter: parameter.requires_grad for parameter in model.parameters()}
        model.set_adapter(name)
        try:
            yield
        finally:
            model.set_adapter(active)
            for parameter, flag in trainable.items():
                parameter.requires_grad_(flag)


class StaticCache:
    """Every layer's keys and values in tensors allocated once, for the whole prompt and continuation
    (what a CUDA graph needs: the same addresses at every step), written at ``positions`` (a tensor the
    decoder sets: the prompt's slots, then the one slot of the token being decoded)."""

    def __init__(self, length: int):
        self.length = length
        self.positions = None
        self.keys: dict[int, object] = {}
        self.values: dict[int, object] = {}

    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
        if layer_idx not in self.keys:
            self.keys[layer_idx] = key_states.new_zeros((*key_states.shape[:2], self.length, key_states.shape[3]))
            self.values[layer_idx] = value_states.new_zeros((*value_states.shape[:2], self.length,
                                                             value_states.shape[3]))
        keys, values = self.keys[layer_idx], self.values[layer_idx]
        keys.index_copy_(2, self.positions, key_states)
        values.index_copy_(2, self.positions, value_states)
        return keys, values

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0  # positions are always passed: nothing asks


class Decoder:
    """Greedy decoding of one batch shape (rows x prompt width, up to ``max_new_tokens``) with a static
    cache; on a GPU every step after the first is a replay of one CUDA graph.

    The prompt runs as one ordinary forward pass (its mask: causal over the row's real tokens; a pad
    position sees itself, so no row of attention is empty). Each step then feeds the chosen tokens at
    cache slot ``index`` and position ``position``, its mask the row's real tokens up to that slot, and
    chooses the next: argmax (after the generation config's repetition penalty, if it has one), padding
    once a row has stopped, as transformers' greedy search. ``run`` can be called again with other
    prompts of the same shape (merge's speed: a warm-up, then the timed run replays the graph recorded
    in the first); the graph holds the adapter that was active (or off) when it was recorded.
    """

    CHECK_EVERY = 8  # steps between looks (a GPU -> CPU sync) at whether every row has stopped

    def __init__(self, model, rows: int, width: int, max_new_tokens: int, stop_ids: set[int], pad: int, device,
                 graph: bool | None = None):
        import torch

        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, not {max_new_tokens}")
        self.model, self.rows, self.width, self.max_new_tokens, self.pad = model, rows, width, max_new_tokens, pad
        penalty = getattr(getattr(model, "generation_config", None), "repetition_penalty", None)
        self.penalty = None if penalty in (None, 1, 1.0) else float(penalty)
        self.penalized = None  # rows x (vocabulary + 1): the tokens a repetition penalty applies to
        self.device = device
        self.graph_wanted = device.type == "cuda" if graph is None else graph
        self.graph = None
        length = width + max_new_tokens
        self.cache = StaticCache(length)
        self.slots = torch.arange(length, device=device)
        self.valid = torch.ones((rows, length), dtype=torch.bool, device=device)
        self.stops = torch.tensor(sorted(stop_ids), dtype=torch.long, device=device)
        self.tokens = torch.full((rows, max_new_tokens), pad, dtype=torch.long, device=device)
        self.token = torch.zeros((rows, 1), dtype=torch.long, device=device)
        self.position = torch.zeros((rows, 1), dtype=torch.long, device=device)
        self.index = torch.zeros(1, dtype=torch.long, device=device)
        self.step_index = torch.zeros(1, dtype=torch.long, device=device)
        self.finished = torch.zeros(rows, dtype=torch.bool, device=device)

    def run(self, input_ids, attention, on_first_token=None):
        """The new tokens (rows x n, n <= max_new_tokens: it ends when every row has stopped).

        Args:
            on_first_token: called once the first new token is on the host's side of the GPU (speed).
        """
        import torch

        input_ids, attention = input_ids.to(self.device), attention.to(self.device)
        self.valid[:, : self.width] = attention.bool()
        self.finished.zero_()
        self.step_index.zero_()
        self._prefill(input_ids, attention)
        if on_first_token is not None:
            self.tokens[:, :1].cpu()
            on_first_token()
        done = 1
        while done < self.max_new_tokens:
            if self.stops.numel() and done % self.CHECK_EVERY == 0 and bool(self.finished.all()):
                break
            if self.graph is not None or self.graph_wanted and done == 2 and self._record():
                self.graph.replay()
            else:
                self._step()
            done += 1
        tokens = self.tokens[:, :done].cpu()
        if self.stops.numel():  # as transformers: the continuation ends at the step the last row stopped
            stopped = torch.isin(tokens, self.stops.cpu())
            if bool(stopped.any(dim=1).all()):
                tokens = tokens[:, : int(stopped.int().argmax(dim=1).max()) + 1]
        return tokens

    def close(self) -> None:
        """Free the graph, its memory pool and the cache now (a stage loads its next model after this),
        and cuBLAS's workspaces, one of them for the recording's stream (34 MB on an H200 that the
        memory budget would otherwise count against the next model: they are made again when needed)."""
        import torch

        if self.graph is not None:
            self.graph.reset()
            clear = getattr(torch._C, "_cuda_clearCublasWorkspaces", None)
            if clear is not None:
                torch.cuda.synchronize(self.device)
                clear()
        self.graph, self.cache, self.model = None, None, None

    def _prefill(self, input_ids, attention) -> None:
        import torch

        width = input_ids.shape[1]
        prompt_slots = self.slots[:width]
        seen = (self.slots[None, :] <= prompt_slots[:, None])[None] & self.valid[:, None, :]
        seen |= (self.slots[None, :] == prompt_slots[:, None])[None]
        positions = (attention.cumsum(-1) - 1).clamp(min=0)
        self.cache.positions = prompt_slots
        logits = self.model(input_ids=input_ids, position_ids=positions, attention_mask=seen[:, None],
                            past_key_values=self.cache, use_cache=True, logits_to_keep=1).logits
        if self.penalty is not None:  # the prompt's own tokens, not its padding (as transformers)
            vocabulary = logits.shape[-1]
            if self.penalized is None:
                self.penalized = torch.zeros((self.rows, vocabulary + 1), dtype=torch.bool, device=self.device)
            self.penalized.zero_()
            self.penalized.scatter_(1, torch.where(attention.bool(), input_ids.clamp(max=vocabulary), vocabulary), True)
        self.index.fill_(width)
        self.position.copy_(positions[:, -1:] + 1)
        self.cache.positions = self.index
        self._choose(logits[:, -1])

    def _step(self) -> None:
        seen = self.valid & (self.slots <= self.index)
        logits = self.model(input_ids=self.token, position_ids=self.position, attention_mask=seen[:, None, None],
                            past_key_values=self.cache, use_cache=True, logits_to_keep=1).logits
        self.index.add_(1)
        self.position.add_(1)
        self._choose(logits[:, -1])

    def _choose(self, logits) -> None:
        """The next tokens from the last position's logits: transformers' greedy search (float32 scores,
        its repetition penalty over the prompt and the tokens chosen so far, argmax)."""
        import torch

        if self.penalty is not None:
            scores = logits.float()
            penalized = self.penalized[:, : scores.shape[-1]]
            scores = torch.where(penalized, torch.where(scores < 0, scores * self.penalty, scores / self.penalty),
                                 scores)
            chosen = torch.where(self.finished, self.pad, scores.argmax(-1))
            self.penalized.scatter_(1, chosen[:, None].clamp(max=self.penalized.shape[1] - 1), True)
        else:
            chosen = torch.where(self.finished, self.pad, logits.argmax(-1))
        self.tokens.index_copy_(1, self.step_index, chosen[:, None])
        self.step_index.add_(1)
        if self.stops.numel():
            self.finished |= torch.isin(chosen, self.stops)
        self.token.copy_(chosen[:, None])

    def _record(self) -> bool:
        """One step as a CUDA graph (recording runs nothing: the replay after it is the step). A model
        whose step cannot be recorded (an operation that waits for the host) decodes step by step."""
        import torch

        graph = torch.cuda.CUDAGraph()
        stream = torch.cuda.current_stream(self.device)
        try:
            with torch.cuda.graph(graph, capture_error_mode="thread_local"):  # other threads may use CUDA
                self._step()
        except RuntimeError as error:
            torch.cuda.set_stream(stream)  # a failed recording can leave its side stream current
            log.warning("Decoding without a CUDA graph (%s): one launch per kernel, slower", str(error).splitlines()[0])
            self.graph_wanted = False
            return False
        self.graph = graph
        return True
