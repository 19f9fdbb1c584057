"""The end-of-layer bookkeeping both the simulator and the real executor call (issue #20)."""
from collections import Counter

from moesim.engine.pins import PinLedger


class _Gpu:
    def __init__(self):
        self.pins = Counter()

    def pin(self, key):
        self.pins[key] += 1

    def unpin(self, key):
        self.pins[key] -= 1

    def unpin_all(self, keys):
        for key in keys:
            self.unpin(key)


class _Ledger(PinLedger):
    def __init__(self):
        self.loads, self.gpu, self.stale_pins, self.protected = {}, _Gpu(), {}, {}


def test_layer_done_unpins_layer_and_releases_protections_up_to_it():
    led = _Ledger()
    for k in (1, 2):
        led._pin(k)
    led._protect(3, (0, 1))   # targets this layer: released
    led._protect(4, (0, 0))   # an earlier layer: released
    led._protect(5, (0, 2))   # a later layer: kept
    led._layer_done(0, 1, [1, 2])
    assert {k: n for k, n in led.gpu.pins.items() if n} == {5: 1}
    assert list(led.protected) == [(0, 2)]


def test_layer_done_skips_stale_pins():
    led = _Ledger()
    led._pin(7)
    led.stale_pins[7] = 1    # a pin taken by a load that never got a slot
    led._layer_done(0, 0, [7])
    assert led.gpu.pins[7] == 1 and led.stale_pins == {}
