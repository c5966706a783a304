"""First-fit extent allocator for the store file (offsets and spans in bytes, 4096-aligned).

Copy-on-write needs a second extent while a tensor is rewritten: ``alloc`` the new one, ``free``
the old one after the commit. Freed extents merge with their neighbours, and a free extent at the
end of the file shrinks ``end`` so the file does not grow while the working set does not.
"""
from __future__ import annotations

import bisect


class ExtentAllocator:
    def __init__(self):
        self.holes: list[tuple[int, int]] = []     # free (offset, span), sorted by offset
        self.end = 0                               # first byte past the last allocated extent

    def alloc(self, span: int) -> tuple[int, int]:
        for i, (off, size) in enumerate(self.holes):
            if size >= span:
                if size == span:
                    del self.holes[i]
                else:
                    self.holes[i] = (off + span, size - span)
                return off, span
        off, self.end = self.end, self.end + span
        return off, span

    def free(self, extent: tuple[int, int]) -> None:
        off, span = extent
        if span == 0:
            return
        i = bisect.bisect(self.holes, (off, span))
        self.holes.insert(i, (off, span))
        if i + 1 < len(self.holes) and off + span == self.holes[i + 1][0]:          # merge right
            self.holes[i] = (off, span + self.holes.pop(i + 1)[1])
        if i > 0 and self.holes[i - 1][0] + self.holes[i - 1][1] == off:            # merge left
            self.holes[i - 1] = (self.holes[i - 1][0], self.holes[i - 1][1] + self.holes.pop(i)[1])
        if self.holes and sum(self.holes[-1]) == self.end:                        # give back the tail
            self.end = self.holes.pop()[0]

    def allocated(self) -> int:
        return self.end - sum(s for _, s in self.holes)
