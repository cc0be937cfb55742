/**
 * Answer extraction (strict and flexible), number normalisation and
 * comparison, gold parsing, and the reward with its configurable weights.
 */
import assert from "node:assert/strict";
import { extractAnswer, type ExtractMethod, MARKER_METHODS } from "../data/answer.ts";
import { answersMatch, normalizeNumber, parseGold, plainText } from "../data/numbers.ts";
import { type Completion, DEFAULT_REWARD_CONFIG, isOverLength, reward, rewardConfig } from "../rl/reward.ts";

/** [text, flexible value, flexible method, strict value] */
type Case = [string, string | null, ExtractMethod | null, string | null];

const CASES: Case[] = [
  // #### in its many spellings
  ["#### 72", "72", "####", "72"],
  ["Natalia sold 48/2 = 24 clips in May.\n#### 72", "72", "####", "72"],
  ["#### $1,234.50.", "1234.5", "####", "1234.5"],
  ["#### -3", "-3", "####", "-3"],
  ["#### \u22125", "-5", "####", "-5"],
  ["####42", "42", "####", "42"],
  ["#### 1,000", "1000", "####", "1000"],
  ["#### 1000.00", "1000", "####", "1000"],
  ["#### 0.50", "0.5", "####", "0.5"],
  ["#### .5", "0.5", "####", "0.5"],
  ["#### 3/4", "0.75", "####", "0.75"],
  ["#### 1/3", "1/3", "####", "1/3"],
  ["#### 1 1/2 cups", "1.5", "####", "1.5"],
  ["#### 25%", "25", "####", "25"],
  ["#### 18 dollars", "18", "####", "18"],
  ["#### 1,0000", "10000", "####", "10000"], // commas dropped wherever they stand, as lm-eval and verl
  ["#### 1e3", "1000", "####", "1000"], // an exponent is read, not taken for a unit ("5x" → 5): not 1
  ["#### 2.5E-2", "0.025", "####", "0.025"],
  ["#### 1e400", null, null, null], // past ±100: no number, rather than 1
  ["I had 3 apples and 5 pears, 8 in all.\n#### 8", "8", "####", "8"],
  ["#### 5\nWait, let me redo this.\n#### 7", "7", "####", "7"], // the last marker wins
  ["I'll end with #### <number>.\n6 * 7 = 42\n#### 42", "42", "####", "42"],
  ["#### **42**", "42", "####", null], // markup: flexible only
  ["####\n42", "42", "####", null],
  ["#### $\\boxed{42}$", "42", "####", null],
  ["#### The answer is 42", "42", "answer_phrase", null], // letters first: not a #### answer
  ["#### Step 1: add 2 and 3\nThe answer is \\boxed{5}", "5", "boxed", null],
  ["#### 3 + 4 = 7", "7", "####", "3"], // the line's final value; strict reads the number right after
  ["#### 12\n#### Step 2: check", "12", "####", "12"], // a trailing heading does not hide the answer
  // final-answer phrases
  ["The final answer is 42.", "42", "final_answer", null],
  ["The final answer is $42.", "42", "final_answer", null],
  ["Final Answer: \\boxed{17}", "17", "final_answer", null],
  ["**Final Answer**\n\\[\n\\boxed{17}\n\\]", "17", "final_answer", null],
  ["The answer is: 1,234", "1234", "answer_phrase", null], // phrases: found, but no marker
  ["Answer: -7 degrees", "-7", "answer_phrase", null],
  ["**Answer:** 12 apples", "12", "answer_phrase", null],
  ["So the answer is 12 + 3 = 15.", "15", "answer_phrase", null], // the final value of the line
  ["The answer is 15. She has 3 left.", "15", "answer_phrase", null], // up to the sentence end
  ["The answer is 5 (2 + 3).", "5", "answer_phrase", null],
  ["Final Answer: 5 + 5 = 10", "10", "final_answer", null],
  ["The final answer is $1,234.50.", "1234.5", "final_answer", null],
  ["The answer is 5. Hmm, no.\nFinal answer: 7", "7", "final_answer", null],
  ["Final Answer: The final answer is 42. I hope it is correct.", "42", "final_answer", null],
  // \boxed
  ["So we get \\boxed{\\frac{3}{4}}", "0.75", "boxed", null],
  ["\\boxed{\\dfrac{-1}{2}}", "-0.5", "boxed", null],
  ["\\boxed{1{,}000}", "1000", "boxed", null],
  ["\\boxed{17 \\text{ apples}}", "17", "boxed", null],
  ["\\boxed{x = 5}", "5", "boxed", null],
  ["first \\boxed{3}, then corrected: \\boxed{4}", "4", "boxed", null],
  ["\\boxed{\\boxed{5} + 1 = 6}", "6", "boxed", null], // nested: the outer box closes last
  ["the box \\boxed{5 is never closed", "5", "last_number", null],
  ["\\boxed{\\$18}", "18", "boxed", null],
  // last-number fallback
  ["She has 3 apples and buys 4 more, so 7", "7", "last_number", null],
  ["It costs $12.", "12", "last_number", null],
  ["Total: 2,500 dollars.", "2500", "last_number", null],
  ["The temperature drops to \u22128", "-8", "last_number", null],
  ["so 48/2 = 24", "24", "last_number", null],
  ["x2 and COVID19", null, null, null], // digits glued to letters are not numbers
  // "final answer" in passing is not the marker; the marker's forms; a list item is not a minus sign
  [
    "To get the final answer, we subtract: 20 - 5 = 15. Then add 3 for tax.\n\\boxed{18}",
    "18",
    "boxed",
    null,
  ],
  [
    "In the final answer I will use 2 decimals. 1.5+2.25 = 3.75\nThe answer is 3.75",
    "3.75",
    "answer_phrase",
    null,
  ],
  ["The final answer is:\n42", "42", "final_answer", null],
  ["Final answer is\n42", "42", "final_answer", null],
  ["## Final Answer\n42 apples", "42", "final_answer", null],
  ["**Final Answer:** 7", "7", "final_answer", null],
  ["The final answer is:\n- 42", "42", "final_answer", null],
  ["Answer:\n- 5 apples", "5", "answer_phrase", null],
  ["The answer is -5", "-5", "answer_phrase", null],
  ["**Final Answer** 42", "42", "final_answer", null],
  ["Final Answer (in dollars): 42", "42", "final_answer", null],
  ["The final answer, therefore, is 42.", "42", "final_answer", null],
  ["final answer \u2014 42", "42", "final_answer", null],
  ["Final Answer: $\\boxed{5}$", "5", "final_answer", null],
  ["FINAL ANSWER = 7", "7", "final_answer", null],
  ["Final answer: -5", "-5", "final_answer", null],
  // nothing
  ["I don't know.", null, null, null],
  ["", null, null, null],
  ["#### <number>", null, null, null],
];

Deno.test(`extractAnswer: ${CASES.length} cases, flexible and strict`, () => {
  for (const [text, value, method, strict] of CASES) {
    const f = extractAnswer(text);
    assert.deepEqual(
      f,
      { value, method, marker: method !== null && MARKER_METHODS.includes(method) },
      `flexible ${JSON.stringify(text)}`,
    );
    const s = extractAnswer(text, { mode: "strict" });
    assert.deepEqual(
      s,
      { value: strict, method: strict === null ? null : "####", marker: strict !== null },
      `strict ${JSON.stringify(text)}`,
    );
  }
});

Deno.test("extractAnswer: degenerate repetitive completions take linear time", () => {
  for (const unit of ["#### ", "The answer is ", "\\boxed{", "Final Answer: ", "1 ", "1,", "$-"]) {
    const text = unit.repeat(Math.ceil(200_000 / unit.length));
    const t0 = performance.now();
    extractAnswer(text);
    extractAnswer(text, { mode: "strict" });
    // A hang guard, not a speed claim: linear work takes milliseconds here, quadratic work (4·10^10 steps)
    // minutes, so a bound far above the first cannot flake on a busy machine and still catches the second.
    const ms = performance.now() - t0;
    assert.ok(ms < 30_000, `${JSON.stringify(unit)} × ${text.length / unit.length}: ${ms.toFixed(0)} ms`);
  }
  // a marker's answer is looked for within 400 characters after it
  assert.equal(extractAnswer(`The answer is ${"-".repeat(500)} 5 and then 6`).method, "last_number");
});

Deno.test("extractAnswer: bad arguments are errors", () => {
  assert.throws(() => extractAnswer(42 as unknown as string), /expected a string, got number/);
  assert.throws(() => extractAnswer("1", { mode: "loose" as "strict" }), /"strict" or "flexible"/);
});

Deno.test("normalizeNumber: one canonical string per number", () => {
  const cases: [string | number, string | null][] = [
    ["1,000", "1000"],
    ["$1,234.50.", "1234.5"],
    ["1000.0", "1000"],
    ["007", "7"],
    ["-0.0", "0"],
    ["\u221212", "-12"],
    ["3/4", "0.75"],
    ["6/8", "0.75"],
    ["2/6", "1/3"],
    ["-2/6", "-1/3"],
    ["\\frac{1}{8}", "0.125"],
    ["1/0", null],
    ["5 dollars", "5"],
    ["1e3", "1000"],
    ["-1.5e+2", "-150"],
    ["4E-1", "0.4"],
    ["1e101", null],
    ["3e kg", "3"],
    ["none", null],
    [0.1, "0.1"],
    [-3, "-3"],
    [1e21, "1000000000000000000000"],
    [1e-7, "0.0000001"],
    [NaN, null],
    [Infinity, null],
  ];
  for (const [raw, want] of cases) assert.equal(normalizeNumber(raw), want, JSON.stringify(raw));
});

Deno.test("answersMatch: numeric equality, exact", () => {
  const equal: [string | number, string | number][] = [
    ["1,000", "1000"],
    ["1000.0", 1000],
    ["$1000", "1000"],
    ["3/4", "0.75"],
    ["\\frac{3}{4}", 0.75],
    ["\u22125", "-5"],
    ["5 dollars", 5],
    ["42.", "42"],
    ["1 1/2", 1.5],
  ];
  for (const [a, b] of equal) assert.ok(answersMatch(a, b), `${a} = ${b}`);
  const unequal: [string | number | null, string | number][] = [
    ["5", "-5"],
    ["0.333", "1/3"],
    ["1001", "1000"],
    // Same numerator, other denominator: a half is not 1, nor 1/3.
    ["0.5", 1],
    ["1/2", "1/3"],
    [null, "5"],
    ["no number", "5"],
    ["5", "no number"],
  ];
  for (const [a, b] of unequal) assert.ok(!answersMatch(a, b), `${a} != ${b}`);
  // no floating-point rounding: 0.1 + 0.2 is 0.3 exactly here
  assert.ok(answersMatch("0.3", "3/10"));
});

Deno.test("parseGold: numbers, number strings and GSM8K solutions; anything else is null", () => {
  assert.equal(parseGold(72), "72");
  assert.equal(parseGold("1,080"), "1080");
  assert.equal(parseGold(" $18. "), "18");
  assert.equal(parseGold("50%"), "50");
  assert.equal(parseGold("Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n#### 72"), "72");
  assert.equal(parseGold("#### 1,080"), "1080");
  assert.equal(parseGold("72 apples"), null, "a gold string must be only a number");
  assert.equal(parseGold("#### <number>"), null);
  assert.equal(parseGold("#### 5\n#### 6"), "6", "the last marker");
  assert.equal(parseGold("#### 5\n#### six"), null, "a last marker without a number is malformed");
  assert.equal(parseGold("seventy-two"), null);
  // After the marker, a whole number: these read as 1.5 and 5 before. Words after it may follow.
  assert.equal(parseGold("#### 1e400"), null, "an exponent past ±100 is no number");
  assert.equal(parseGold("#### 1e3"), "1000");
  assert.equal(parseGold("1e-2"), "0.01");
  assert.equal(parseGold("#### 1.5.6"), null);
  assert.equal(parseGold("#### 5x"), null);
  assert.equal(parseGold("#### 72 apples"), "72");
  assert.equal(parseGold("#### 5<|endoftext|>"), "5");
  assert.equal(parseGold("#### 1,080."), "1080");
  assert.equal(parseGold("####72\n"), "72");
  assert.equal(parseGold(NaN), null);
});

Deno.test("plainText: LaTeX around numbers becomes plain text", () => {
  assert.equal(plainText("\\frac{3}{4}"), "3/4");
  assert.equal(plainText("1{,}000"), "1,000");
  assert.equal(plainText("\\$5\\,000"), "$5000");
  assert.equal(plainText("\\boxed{17}"), " {17}");
});

const eos = (text: string, n = 3): Completion => ({
  text,
  tokens: Array.from({ length: n }, (_, i) => i),
  finishReason: "eos",
});

Deno.test("reward: defaults are 1/0, +0.05 marker, -0.05 over length", () => {
  assert.deepEqual(
    { ...DEFAULT_REWARD_CONFIG },
    {
      correct: 1,
      wrong: 0,
      markerBonus: 0.05,
      overLengthPenalty: 0.05,
      maxCompletionTokens: null,
      mode: "flexible",
      markerMethods: ["####", "final_answer", "boxed"],
    },
  );
  const ok = reward(eos("6 * 7 = 42\n#### 42"), "42");
  assert.equal(ok.reward, 1.05);
  assert.deepEqual([ok.correct, ok.marker, ok.overLength], [true, true, false]);
  assert.deepEqual(ok.extracted, { value: "42", method: "####", marker: true });

  const noMarker = reward(eos("6 * 7 = 42"), 42);
  assert.equal(noMarker.reward, 1);
  assert.deepEqual([noMarker.correct, noMarker.marker], [true, false]);

  // Only the design's markers earn the bonus: "Final Answer" does, "The answer is" does not.
  assert.equal(reward(eos("Final Answer: 42"), 42).reward, 1.05);
  assert.equal(reward(eos("The final answer is \\boxed{42}"), 42).reward, 1.05);
  const phrase = reward(eos("So the answer is 40 + 2 = 42."), 42);
  assert.deepEqual([phrase.reward, phrase.correct, phrase.marker], [1, true, false]);
  assert.equal(reward(eos("Answer: 42"), 42).reward, 1);

  const wrong = reward(eos("#### 41"), "1,000");
  assert.equal(wrong.reward, 0.05, "the format bonus is paid on a wrong answer too");
  assert.equal(wrong.correct, false);

  const nothing = reward(eos("no idea"), "7");
  assert.equal(nothing.reward, 0);
  assert.deepEqual(nothing.extracted, { value: null, method: null, marker: false });

  const truncated = reward({ text: "6 * 7 = 42\n#### 42", tokens: [1, 2], finishReason: "length" }, "42");
  assert.equal(truncated.reward, 1.05 - 0.05);
  assert.equal(truncated.overLength, true);
});

Deno.test("reward: the gold may be a GSM8K solution; a gold that is not a number is an error", () => {
  assert.equal(reward(eos("#### 72"), "48 + 24 = <<48+24=72>>72\n#### 72").correct, true);
  assert.throws(() => reward(eos("#### 72"), "seventy-two"), /gold answer "seventy-two" is not a number/);
});

Deno.test("reward: every weight and rule is configurable", () => {
  const c = eos("The answer is \\boxed{3/4}");
  const cfg = { correct: 2, wrong: -1, markerBonus: 0.5, overLengthPenalty: 0.25 };
  assert.equal(reward(c, "0.75", cfg).reward, 2.5);
  assert.equal(reward(eos("0.7"), "0.75", cfg).reward, -1);
  assert.equal(reward(c, "0.75", { ...cfg, markerMethods: ["####"] }).reward, 2, "only #### earns the bonus");
  // strict mode: no #### means no answer at all
  const strict = reward(c, "0.75", { mode: "strict" });
  assert.deepEqual([strict.reward, strict.correct, strict.extracted.value], [0, false, null]);
  assert.equal(reward(eos("#### 0.75"), "3/4", { mode: "strict" }).reward, 1.05);
});

Deno.test("isOverLength: truncation, or more content tokens than maxCompletionTokens", () => {
  const mk = (n: number, finishReason: Completion["finishReason"]): Completion => ({
    text: "",
    tokens: new Array(n).fill(0),
    finishReason,
  });
  assert.equal(isOverLength(mk(10, "length"), null), true, "hit the generation cap without EOS");
  assert.equal(isOverLength(mk(10, "eos"), null), false);
  assert.equal(isOverLength(mk(10, "stop"), null), false);
  // 10 tokens ending in EOS = 9 content tokens
  assert.equal(isOverLength(mk(10, "eos"), 9), false);
  assert.equal(isOverLength(mk(10, "eos"), 8), true);
  assert.equal(isOverLength(mk(10, "stop"), 9), true, "a stop string is content: all 10 count");
  assert.equal(isOverLength(mk(10, "stop"), 10), false);
  assert.equal(
    isOverLength(mk(4, "length"), 10),
    true,
    "cut off at the cap: over length, whatever the limit",
  );
  const r = reward({ text: "#### 1", tokens: new Array(20).fill(0), finishReason: "eos" }, 1, {
    maxCompletionTokens: 10,
  });
  assert.deepEqual([r.overLength, r.reward], [true, 1.05 - 0.05]);
});

Deno.test("rewardConfig: bad fields are named", () => {
  assert.throws(
    () => rewardConfig({ correct: NaN }),
    /reward\.correct: expected a number, got NaN \(a number\)/,
  );
  assert.throws(
    () => rewardConfig({ markerBonus: "0.1" as unknown as number }),
    /reward\.markerBonus: expected a number/,
  );
  assert.throws(
    () => rewardConfig({ maxCompletionTokens: 0 }),
    /reward\.maxCompletionTokens: expected an integer ≥ 1, or null, got 0/,
  );
  assert.throws(() => rewardConfig({ maxCompletionTokens: 1.5 }), /reward\.maxCompletionTokens/);
  assert.throws(
    () => rewardConfig({ mode: "lenient" as "strict" }),
    /reward\.mode: expected one of "strict", "flexible"/,
  );
  assert.throws(
    () => rewardConfig({ markerMethods: ["###"] as unknown as ["####"] }),
    /reward\.markerMethods/,
  );
  // A method that is no explicit marker could never earn the bonus: refused rather than ignored.
  assert.throws(
    () => rewardConfig({ markerMethods: ["####", "last_number"] }),
    /reward\.markerMethods: expected a list of "####", "final_answer", "boxed", got/,
  );
  assert.throws(() => reward(eos("#### 1"), 1, { wrong: Infinity }), /reward\.wrong/);
  assert.throws(
    () => rewardConfig({ correct: NaN, wrong: "x" as unknown as number }),
    /^RangeError: 2 problems/,
  );
});
