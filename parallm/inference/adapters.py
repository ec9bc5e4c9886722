"""Which LoRA adapter is loaded under which name, in which slot, and who still uses it.

Plain Python, no tensors (the slots' weights live in `lora.LoraBank`). An adapter gets a slot
when it is loaded and a `cache_key` unique to that load, which salts the prefix-cache hashes of
its sequences. Unloading is graceful: the name goes at once (new requests for it fail), the
requests already admitted finish on the adapter, and the slot is free for another adapter only
when the last of them has finished.
"""

from __future__ import annotations

from dataclasses import dataclass

from parallm.errors import UserError

NAME_MAX = 200  # as long as the usage records' model column


@dataclass(eq=False)
class LoadedAdapter:
    """One load of an adapter: `in_flight` requests use it; `removed` once it was unloaded."""

    name: str
    path: str
    slot: int
    cache_key: int
    rank: int
    in_flight: int = 0
    removed: bool = False


class AdapterRegistry:
    """Names to adapters, over `max_loras` slots."""

    def __init__(self, max_loras: int) -> None:
        self.max_loras = max_loras
        self.by_name: dict[str, LoadedAdapter] = {}
        self._slots: list[LoadedAdapter | None] = [None] * max_loras
        self._last_key = 0  # a plain int: the registry pickles (a server's view of it)

    def check_name(self, name: str) -> None:
        """A UserError unless `name` is a valid name no loaded adapter has."""
        if not isinstance(name, str) or not name.strip() or len(name) > NAME_MAX:
            raise UserError(f"name: {name!r} is not valid; give 1 to {NAME_MAX} characters")
        if any(c.isspace() for c in name):
            raise UserError(f"name: {name!r} is not valid; no spaces")
        if name in self.by_name:
            raise UserError(
                f"name: an adapter called {name!r} is loaded already; unload it first or choose "
                "another name"
            )

    def free_slot(self) -> int:
        """A slot for a new adapter; a UserError when none is free. Takes nothing: `add` does."""
        for slot, held in enumerate(self._slots):
            if held is None:
                return slot
        draining = [a.name for a in self._slots if a is not None and a.removed]
        busy = f"; {', '.join(draining)} still finish their requests" if draining else ""
        raise UserError(
            f"max_loras: all {self.max_loras} adapter slots are in use ({', '.join(self.by_name)}"
            f"{busy}); unload one, or start with more slots (serve: --max-loras)"
        )

    def add(self, name: str, path: str, slot: int, rank: int) -> LoadedAdapter:
        """Record that `slot` (from `free_slot`) now holds the adapter `name` (checked)."""
        assert self._slots[slot] is None and name not in self.by_name
        self._last_key += 1
        adapter = LoadedAdapter(name, path, slot, self._last_key, rank)
        self._slots[slot] = self.by_name[name] = adapter
        return adapter

    def acquire(self, name: str) -> LoadedAdapter:
        """The adapter `name` for one more request (`release` it when the request ends)."""
        adapter = self.by_name.get(name)
        if adapter is None:
            loaded = ", ".join(self.by_name) or "none"
            raise UserError(f"model: no adapter {name!r} is loaded (loaded: {loaded})")
        adapter.in_flight += 1
        return adapter

    def release(self, adapter: LoadedAdapter) -> None:
        adapter.in_flight -= 1
        assert adapter.in_flight >= 0, f"adapter {adapter.name} released too often"
        if adapter.removed and adapter.in_flight == 0:
            self._slots[adapter.slot] = None

    def remove(self, name: str) -> LoadedAdapter:
        """Unload `name`: gone for new requests now; its slot is freed once the requests using
        it (`in_flight`, returned) have finished."""
        adapter = self.by_name.pop(name, None)
        if adapter is None:
            loaded = ", ".join(self.by_name) or "none"
            raise UserError(f"name: no adapter {name!r} is loaded (loaded: {loaded})")
        adapter.removed = True
        if adapter.in_flight == 0:
            self._slots[adapter.slot] = None
        return adapter

    def draining(self) -> list[LoadedAdapter]:
        """Unloaded adapters whose requests still run."""
        return [a for a in self._slots if a is not None and a.removed]
