"""A TorchFunctionMode spy: every tensor operation made inside ``with Spy() as spy:``, in order."""
import torch
from torch.overrides import TorchFunctionMode


class Spy(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.calls = []  # (operation name, positional args)

    @property
    def ops(self) -> list:
        return [name for name, _ in self.calls]

    GATHERS = {"take", "index_select", "gather", "embedding", "take_along_dim"}

    def tensor_indexing(self) -> list:
        """The calls that gather by a tensor of indices: ``t[:, i]``, ``t[i]``, ``take``, ``index_select``, ..."""
        return [(name, args) for name, args in self.calls if name in self.GATHERS or name == "__getitem__" and any(
            isinstance(a, torch.Tensor) for a in (args[1] if isinstance(args[1], tuple) else (args[1],)))]

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.calls.append((getattr(func, "__name__", str(func)), args))
        return func(*args, **(kwargs or {}))
