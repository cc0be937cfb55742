/**
 * Tests for tensor lifetimes: tidy, tidyAsync (including two concurrent
 * scopes), keep, `using`, dispose, and noGrad's restoring of grad mode.
 * Tensors live on MOERL_TEST_DEVICE with float dtype MOERL_TEST_DTYPE.
 */
import assert from "node:assert/strict";
import {
  dispose,
  isGradEnabled,
  keep,
  liveTensors,
  nativeLiveCount,
  noGrad,
  setGradEnabled,
  type Tensor,
  tidy,
  tidyAsync,
} from "../ffi/mod.ts";
import { assertNoLeak } from "./util.ts";
import { ft } from "./ops_helpers.ts";

/** A sync step checked for leaks (no enclosing tidy: these tests manage lifetimes themselves). */
function step(t: Deno.TestContext, name: string, fn: () => void): Promise<boolean> {
  return t.step(name, () => assertNoLeak(fn, name));
}

/** An async step checked for leaks, JS-side and native-side. */
function stepAsync(t: Deno.TestContext, name: string, fn: () => Promise<void>): Promise<boolean> {
  return t.step(name, async () => {
    const js = liveTensors(), native = nativeLiveCount();
    await fn();
    assert.equal(liveTensors(), js, `${name} leaked ${liveTensors() - js} tensors`);
    assert.equal(nativeLiveCount(), native, `${name} leaked ${nativeLiveCount() - native} native handles`);
  });
}

/** A promise and the function that resolves it. */
function gate(): { wait: Promise<void>; open: () => void } {
  let open!: () => void;
  const wait = new Promise<void>((r) => (open = r));
  return { wait, open };
}

/** Lets every queued microtask and timer callback run. */
const tick = () => new Promise<void>((r) => setTimeout(r, 0));

/** Asserts the live counts moved by exactly delta since (js, native). */
function assertLive(js: number, native: number, delta: number, what: string): void {
  assert.equal(liveTensors(), js + delta, `${what}: liveTensors`);
  assert.equal(nativeLiveCount(), native + delta, `${what}: nativeLiveCount`);
}

Deno.test("tidy", async (t) => {
  await step(t, "frees temporaries, returns the result", () => {
    using x = ft([1, 2, 3]);
    const js = liveTensors(), native = nativeLiveCount();
    let tmp: Tensor | undefined;
    const y = tidy(() => {
      tmp = x.mul(2);
      return tmp.add(1);
    });
    assert.ok(tmp!.disposed, "temporary freed");
    assert.ok(!y.disposed && !x.disposed);
    assertLive(js, native, 1, "after tidy");
    assert.deepEqual(y.toArray(), [3, 5, 7]);
    y.dispose();
  });

  await step(t, "returns arrays, objects, Maps and Sets of results", () => {
    using x = ft([1, 2]);
    const js = liveTensors(), native = nativeLiveCount();
    const r = tidy(() => {
      x.neg(); // a temporary
      return {
        a: x.add(1),
        list: [x.add(2), [x.add(3)]],
        map: new Map([["k", x.add(4)]]),
        set: new Set([x.add(5)]),
        keyed: new Map([[x.add(6), "a tensor as a key"]]),
        bare: Object.assign(Object.create(null), { t: x.add(7) }),
        n: 7,
      };
    });
    assertLive(
      js,
      native,
      7,
      "seven results survive (Map keys and null-prototype objects too), not the temporary",
    );
    assert.deepEqual(r.a.toArray(), [2, 3]);
    assert.deepEqual((r.list[1] as Tensor[])[0]!.toArray(), [4, 5]);
    assert.deepEqual(r.map.get("k")!.toArray(), [5, 6]);
    assert.equal(r.n, 7);
    dispose(r);
    assertLive(js, native, 0, "after dispose(r)");
    // Multi-result ops return plain objects, which escape too.
    const top = tidy(() => x.mul(3).topk(1));
    assertLive(js, native, 2, "values and indices survive");
    assert.deepEqual([top.values.toArray(), top.indices.toArray()], [[6], [1]]);
    dispose(top);
  });

  await step(t, "nested tidy moves returned tensors to the outer scope", () => {
    using x = ft([1, 2]);
    const js = liveTensors(), native = nativeLiveCount();
    let innerTmp: Tensor | undefined, kept: Tensor | undefined, dropped: Tensor | undefined;
    const out = tidy(() => {
      const [a, b] = tidy(() => {
        innerTmp = x.add(0);
        return [innerTmp.mul(2), x.mul(3)];
      });
      assert.ok(innerTmp!.disposed, "inner temporary freed by the inner scope");
      assert.ok(!a!.disposed && !b!.disposed, "inner results alive in the outer scope");
      kept = a;
      dropped = b;
      return a!.add(1);
    });
    assert.ok(kept!.disposed, "inner result not returned by the outer scope is freed by it");
    assert.ok(dropped!.disposed);
    assert.ok(!out.disposed);
    assert.deepEqual(out.toArray(), [3, 5]);
    assertLive(js, native, 1, "only the outer result survives");
    out.dispose();
  });

  await step(t, "an inner result returned again escapes both scopes", () => {
    using x = ft([1]);
    const r = tidy(() => tidy(() => x.add(1)));
    assert.ok(!r.disposed);
    assert.deepEqual(r.toArray(), [2]);
    r.dispose();
  });

  await step(t, "keep() survives tidy, nested or not", () => {
    using x = ft([1, 2]);
    const js = liveTensors(), native = nativeLiveCount();
    let k1: Tensor | undefined, k2: Tensor | undefined, tmp: Tensor | undefined;
    tidy(() => {
      k1 = keep(x.add(1));
      tmp = x.add(2);
      tidy(() => {
        k2 = keep(x.add(3));
      });
    });
    assert.ok(tmp!.disposed);
    assert.ok(!k1!.disposed && !k2!.disposed);
    assert.ok(k1!.kept);
    assertLive(js, native, 2, "kept tensors");
    assert.deepEqual(k2!.toArray(), [4, 5]);
    k1!.dispose();
    k2!.dispose();
  });

  await step(t, "frees everything when fn throws", () => {
    using x = ft([1]);
    let tmp: Tensor | undefined;
    assert.throws(() =>
      tidy(() => {
        tmp = x.add(1);
        throw new Error("boom");
      }), /boom/);
    assert.ok(tmp!.disposed);
    assert.ok(!x.disposed);
  });

  await step(t, "throws TypeError if fn returns a Promise", () => {
    using x = ft([1]);
    let tmp: Tensor | undefined;
    assert.throws(() => tidy(() => Promise.resolve(1)), TypeError);
    // An async fn: what it made before its first await is still freed.
    assert.throws(() =>
      tidy(async () => {
        tmp = x.add(1);
        await null;
        return tmp;
      }), TypeError);
    assert.ok(tmp!.disposed);
  });

  await step(t, "a tensor disposed inside tidy is not freed twice", () => {
    using x = ft([1]);
    tidy(() => {
      const a = x.add(1);
      a.dispose();
      a.dispose();
    });
  });
});

Deno.test("tidyAsync", async (t) => {
  await stepAsync(t, "frees temporaries across awaits, returns the result", async () => {
    using x = ft([1, 2]);
    const js = liveTensors(), native = nativeLiveCount();
    const tmps: Tensor[] = [];
    const y = await tidyAsync(async () => {
      tmps.push(x.add(1));
      await tick();
      tmps.push(tmps[0]!.mul(2));
      await tick();
      return { y: tmps[1]!.add(1) };
    });
    assert.ok(tmps.every((tt) => tt.disposed));
    assertLive(js, native, 1, "after tidyAsync");
    assert.deepEqual(y.y.toArray(), [5, 7]);
    dispose(y);
  });

  await stepAsync(
    t,
    "fn throwing before its first await frees what it made and leaves no scope open",
    async () => {
      using x = ft([1, 2]);
      const failing = (): Promise<Tensor> => {
        x.add(1); // a temporary
        throw new Error("sync failure");
      };
      await assert.rejects(() => tidyAsync(failing), /sync failure/);
      // The next scope behaves as before: its temporaries freed, its result returned.
      const y = await tidyAsync(() => Promise.resolve(x.add(1).mul(2)));
      assert.deepEqual(y.toArray(), [4, 6]);
      y.dispose();
    },
  );

  await stepAsync(t, "two concurrent scopes each free only their own tensors", async () => {
    using x = ft([1, 2]);
    const js = liveTensors(), native = nativeLiveCount();
    const gA = gate(), gB = gate(), gA2 = gate();
    const a: Tensor[] = [], b: Tensor[] = [];
    const A = tidyAsync(async () => {
      a.push(x.add(1)); // before its first await
      await gA.wait;
      a.push(a[0]!.mul(2)); // made while B is open too
      await gA2.wait;
      return a[1]!.add(100);
    });
    const B = tidyAsync(async () => {
      b.push(x.add(10));
      await gB.wait;
      b.push(b[0]!.mul(3));
      return b[1]!.sum();
    });
    assertLive(js, native, 2, "both scopes started");
    // Made outside both scopes while they are pending: belongs to neither.
    const outside = x.add(1000);
    gA.open();
    await tick();
    assert.equal(a.length, 2);
    gB.open();
    const rb = await B;
    assert.ok(b.every((tt) => tt.disposed), "B freed its temporaries");
    assert.ok(a.every((tt) => !tt.disposed), "B did not free A's tensors");
    assert.ok(!outside.disposed, "B did not free a tensor made outside it");
    assertLive(js, native, 1 + 2 + 1, "outside, A's two, B's result");
    gA2.open();
    const ra = await A;
    assert.ok(a.every((tt) => tt.disposed), "A freed its temporaries");
    assert.ok(!outside.disposed && !rb.disposed, "A did not free B's result or the outside tensor");
    assertLive(js, native, 3, "outside and the two results");
    assert.deepEqual(ra.toArray(), [104, 106]);
    assert.deepEqual(rb.toArray(), [(11 + 12) * 3]);
    dispose([ra, rb, outside]);
  });

  await stepAsync(t, "nested tidyAsync moves returned tensors to the parent", async () => {
    using x = ft([1]);
    let dropped: Tensor | undefined, innerTmp: Tensor | undefined;
    const out = await tidyAsync(async () => {
      const [r1, r2] = await tidyAsync(async () => {
        await tick();
        innerTmp = x.add(0);
        return [innerTmp.add(1), innerTmp.add(2)];
      });
      assert.ok(innerTmp!.disposed);
      assert.ok(!r2!.disposed);
      dropped = r2;
      await tick();
      return r1!;
    });
    assert.ok(dropped!.disposed, "the parent frees what it did not return");
    assert.deepEqual(out.toArray(), [2]);
    out.dispose();
  });

  await stepAsync(t, "a tidyAsync started inside a sync tidy owns its tensors", async () => {
    using x = ft([1]);
    const js = liveTensors(), native = nativeLiveCount();
    let early: Tensor | undefined;
    let pending: Promise<Tensor> | undefined;
    tidy(() => {
      pending = tidyAsync(async () => {
        early = x.add(1); // made before the first await, while the sync tidy is open
        await tick();
        return early.add(1);
      });
    });
    assert.ok(!early!.disposed, "the sync tidy must not free the async scope's tensor");
    const out = await pending!;
    assert.ok(early!.disposed, "the async scope frees it when it settles");
    assert.deepEqual(out.toArray(), [3]);
    out.dispose();
    assertLive(js, native, 0, "nothing left");
  });

  await stepAsync(t, "a sync tidy inside tidyAsync hands results to the async scope", async () => {
    using x = ft([1]);
    let inner: Tensor | undefined;
    const out = await tidyAsync(async () => {
      await tick();
      inner = tidy(() => x.add(1).mul(2));
      await tick();
      return inner.add(1);
    });
    assert.ok(inner!.disposed, "freed by the async scope");
    assert.deepEqual(out.toArray(), [5]);
    out.dispose();
  });

  await stepAsync(t, "keep() and rejection", async () => {
    using x = ft([1]);
    let k: Tensor | undefined, tmp: Tensor | undefined;
    await assert.rejects(
      tidyAsync(async () => {
        k = keep(x.add(1));
        await tick();
        tmp = x.add(2);
        throw new Error("async boom");
      }),
      /async boom/,
    );
    assert.ok(tmp!.disposed, "temporaries freed on rejection");
    assert.ok(!k!.disposed, "kept tensor survives");
    k!.dispose();
  });
});

Deno.test("using and dispose", async (t) => {
  await step(t, "using frees at block end", () => {
    const js = liveTensors(), native = nativeLiveCount();
    let seen: Tensor | undefined;
    {
      using u = ft([1, 2]);
      seen = u;
      assertLive(js, native, 1, "inside the block");
      assert.ok(!u.disposed);
    }
    assert.ok(seen.disposed);
    assertLive(js, native, 0, "after the block");
  });

  await step(t, "dispose(container) frees arrays, objects, Maps and Sets of tensors", () => {
    const js = liveTensors(), native = nativeLiveCount();
    const ts = [ft([1]), ft([2]), ft([3]), ft([4]), ft([5]), ft([6])];
    assertLive(js, native, 6, "created");
    dispose([ts[0], { b: ts[1], c: [ts[2], "text", 3, null] }, new Map([["d", ts[3]]]), new Set([ts[4]])]);
    assert.deepEqual(ts.map((x) => x.disposed), [true, true, true, true, true, false]);
    assertLive(js, native, 1, "one left");
    dispose(ts[5]);
    assert.ok(ts[5]!.disposed);
    dispose(null);
    dispose(undefined);
    dispose(42);
    dispose({ nothing: "here" });
    assertLive(js, native, 0, "all freed");
  });

  await step(t, "dispose is idempotent; use after dispose throws", () => {
    const js = liveTensors(), native = nativeLiveCount();
    const a = ft([1]), b = ft([2]);
    a.dispose();
    a.dispose();
    assertLive(js, native, 1, "one dispose counted once");
    dispose([a, b]);
    dispose([a, b]);
    assertLive(js, native, 0, "container dispose twice");
    assert.ok(a.disposed && b.disposed);
    assert.throws(() => a.add(1), /used after dispose/);
    assert.throws(() => a.toArray(), /used after dispose/);
    assert.equal(String(a), "Tensor(disposed)");
  });
});

Deno.test("noGrad", async (t) => {
  await step(t, "turns grad off inside and restores it, also when fn throws", () => {
    assert.equal(isGradEnabled(), true);
    assert.equal(noGrad(() => isGradEnabled()), false);
    assert.equal(noGrad(() => 42), 42);
    assert.equal(isGradEnabled(), true);
    assert.throws(() =>
      noGrad(() => {
        throw new Error("inside noGrad");
      }), /inside noGrad/);
    assert.equal(isGradEnabled(), true, "restored after a throw");
    // Nested: an outer "off" stays off.
    assert.equal(setGradEnabled(false), true);
    noGrad(() => assert.equal(isGradEnabled(), false));
    assert.equal(isGradEnabled(), false);
    assert.equal(setGradEnabled(true), false);
    assert.equal(isGradEnabled(), true);
  });

  await step(t, "ops under noGrad record no history", () => {
    tidy(() => {
      const w = ft([1, 2]).setRequiresGrad();
      assert.equal(w.requiresGrad, true);
      assert.equal(w.mul(2).requiresGrad, true);
      assert.equal(noGrad(() => w.mul(2)).requiresGrad, false);
      assert.equal(w.mul(2).requiresGrad, true, "recording again afterwards");
    });
  });
});
