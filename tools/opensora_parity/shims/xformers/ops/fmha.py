# SHIM: see xformers/ops/__init__.py
class BlockDiagonalMask:
    def __init__(self, q_blocks, kv_blocks):
        self.q_blocks, self.kv_blocks = q_blocks, kv_blocks

    @classmethod
    def from_seqlens(cls, q_seqlen, kv_seqlen=None):
        if kv_seqlen is None:
            kv_seqlen = q_seqlen
        kv_seqlen = [int(x) for x in kv_seqlen]
        assert len(q_seqlen) == len(kv_seqlen)

        def blocks(lens):
            out, s = [], 0
            for n in lens:
                out.append((s, s + n))
                s += n
            return out

        return cls(blocks(list(q_seqlen)), blocks(kv_seqlen))
