"""`charter witness`: a transparency-log witness (C2SP tlog-witness, tlog-cosignature).

A small service of its own, run by someone other than the log's operators (another team,
namespace or organisation), with its own Ed25519 key and its own state. For each log it
knows (an origin and the log's verifier keys), it remembers the latest checkpoint it
cosigned, and cosigns a new one only if the log signed it and a consistency proof shows it
extends that one. It depends on nothing of Charter but the standalone verifier's
primitives, so it can be run from the same package anywhere.
"""
