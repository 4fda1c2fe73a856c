// Drives the official JS SDK against the agent on the socket given as argv[2] and prints
// one JSON document of what came back; tests/test_js_sdk.py checks the cryptography.
import { DstackClient, TappdClient } from "@phala/dstack-sdk";

const socket = process.argv[2];
const client = new DstackClient(socket);
const hex = (bytes) => Buffer.from(bytes).toString("hex");

const key = await client.getKey("js/key", "js-purpose");
const quote = await client.getQuote("js-report-data");
await client.emitEvent("js-event", "js-payload");
const after = await client.getQuote("after-event");
const info = await client.info();
const signed = await client.sign("secp256k1", "js message");
const verified = await client.verify("secp256k1", "js message", signed.signature, signed.public_key);
const tls = await client.getTlsKey({ subject: "js.example", altNames: ["js.example"], usageRaTls: true });
const attestation = await client.attest("js-attest");
const version = await client.version();
const tappd = await new TappdClient(socket).tdxQuote("tappd-data", "sha512");

console.log(JSON.stringify({
  key: hex(key.key),
  signature_chain: key.signature_chain.map(hex),
  quote: quote.quote,
  quote_replay: quote.replayRtmrs(),
  after_quote: after.quote,
  after_event_log: after.event_log,
  after_replay: after.replayRtmrs(),
  info_app_id: info.app_id,
  info_rtmr3: info.tcb_info.rtmr3,
  signature: hex(signed.signature),
  public_key: hex(signed.public_key),
  verified: verified.valid,
  tls_chain: tls.certificate_chain,
  tls_key: tls.key,
  attestation: attestation.attestation,
  version: version.version,
  tappd_quote: tappd.quote,
}));
