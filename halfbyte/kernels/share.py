"""``Share``: one input's LLM.int8() activation quantization, shared by the layers that read it in a row. Plain
Python (no triton import), so that layers and integrations can hold one without importing the kernels."""

from torch import Tensor

#: The one Share holding an entry, if any. Groups run one after another (a block's q/k/v, then its next group), so
#: one live entry serves them all; a group left unfinished (a member skipped) is freed by the next group's first
#: call instead of holding its buffers (~40 MB at FLUX's 4608 x 3072) for as long as the model lives.
_LIVE: list = []


class Share:
    """The quantized activations of one input, shared by the LLM.int8() layers of a group that read that input one
    after another (a block's q, k and v projections): the first member's call quantizes it (outlier flags, row
    quantization, gathered outlier columns) and keeps the result here; the others run only their weight gathers
    and GEMM on it. A FLUX single block quantized its 4608 x 3072 input four times per step.

    An entry is used only by a call with the very same tensor object, address, shape, strides, dtype, threshold and
    stream, and, for tensors that have one (not inference tensors), the same version counter (an in-place change
    in between is seen); it holds the tensor, so no other tensor can take its place. It is dropped once every
    member has used it, replaced by the next first call, or dropped when another share stores one (``_LIVE``).
    Which layers form a group is the caller's knowledge (``halfbyte.sharing``): the input must not change in place
    between the members' calls, which is what the groups there are checked for.
    """

    __slots__ = ("members", "_entry", "_left")

    def __init__(self, members: int):
        if members < 2:
            raise ValueError(f"a Share needs at least 2 members, got {members}")
        self.members = members
        self.clear()

    @property
    def _x(self) -> Tensor | None:
        """The tensor the entry was stored for (None without an entry)."""
        entry = self._entry
        return None if entry is None else entry[0]

    def clear(self) -> None:
        self._entry = None  # one attribute, replaced whole: a reader on another thread sees an entry or none
        self._left = 0
        if _LIVE[:1] == [self]:  # a slice: another thread may empty the list in between
            _LIVE.clear()

    def __reduce__(self):  # copies and pickles start empty (an entry holds device buffers and a tensor)
        return (Share, (self.members,))

    @staticmethod
    def key(A: Tensor, threshold: float, stream: int, kind: str) -> tuple:
        return (kind, A.data_ptr(), A.shape, A.stride(), A.dtype, threshold, stream,
                None if A.is_inference() else A._version)

    def take(self, A: Tensor, key: tuple):
        """The value an earlier member stored for this input, else None."""
        entry = self._entry
        if entry is None or entry[0] is not A or entry[1] != key:
            return None
        self._left -= 1
        if self._left <= 0 and self._entry is entry:
            self.clear()
        return entry[2]

    def put(self, A: Tensor, key: tuple, value) -> None:
        for other in _LIVE[:1]:  # one entry in the process: a group whose last member is never called frees its own
            if other is not self:
                other.clear()
        self._left = self.members - 1
        self._entry = (A, key, value)
        _LIVE[:] = [self]
