// Conduit through the Vercel AI SDK's OpenAI-compatible provider: generateText, streamText and an
// error. Exits non-zero on any failed check; prints one JSON line (the texts) for the pytest caller.
import assert from 'node:assert/strict';
import { createOpenAICompatible } from '@ai-sdk/openai-compatible';
import { APICallError, generateText, streamText } from 'ai';

const MODEL = process.env.CONDUIT_MODEL ?? 'conduit-demo';
const MAX_TOKENS = 12;
const conduit = createOpenAICompatible({
  name: 'conduit',
  baseURL: `${process.env.CONDUIT_URL}/v1`,
  apiKey: 'unused',
  includeUsage: true, // stream_options.include_usage: usage on streamed answers too
});
const request = {
  model: conduit(MODEL),
  system: 'Be brief.',
  prompt: 'Hello there',
  maxOutputTokens: MAX_TOKENS,
  temperature: 0,
  maxRetries: 0,
};

function checkUsage(usage) {
  assert.ok(usage.inputTokens > 0, `inputTokens: ${usage.inputTokens}`);
  assert.equal(usage.outputTokens, MAX_TOKENS);
  assert.equal(usage.totalTokens, usage.inputTokens + usage.outputTokens);
}

const generated = await generateText(request);
assert.ok(generated.text.length > 0, 'generateText returned no text');
assert.equal(generated.finishReason, 'length');
checkUsage(generated.usage);

const streamed = streamText({ ...request, onError: ({ error }) => { throw error; } });
let streamedText = '';
let chunks = 0;
for await (const delta of streamed.textStream) {
  streamedText += delta;
  chunks += 1;
}
assert.equal(streamedText, generated.text, 'streamed text differs from generateText at temperature 0');
assert.ok(chunks > 1, `expected several streamed deltas, got ${chunks}`);
assert.equal(await streamed.finishReason, 'length');
checkUsage(await streamed.usage);

await assert.rejects(generateText({ ...request, model: conduit('no-such-model') }), (error) => {
  assert.ok(APICallError.isInstance(error), `not an APICallError: ${error}`);
  assert.equal(error.statusCode, 404);
  assert.match(error.message, /no-such-model/);
  return true;
});

console.log(JSON.stringify({ generated: generated.text, streamed: streamedText, usage: generated.usage }));
