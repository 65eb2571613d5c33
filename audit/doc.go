// Package audit keeps rayvmm's audit log: a hash-chained, sealed,
// crash-safe record of everything done to VMs, volumes, networks and
// pods, under <state-dir>/audit, with the key under <state-dir>/keys.
//
// The anchors are Linux auditd's record fields, systemd-journald's
// Forward Secure Sealing (`journalctl --verify`) and RFC 6962-style
// transparency logs: an operator can prove what happened, and can tell
// when someone rewrote the log.
//
// # Records
//
// A record (Record) has a gapless seq, a time, an actor (uid, gid, pid,
// command line), an action (VolumeCreate, ...), an object (kind and
// name), string params, a policy decision, a result ("ok" or the error
// text), a level (info, warning, critical), prev and hash, where
//
//	hash = SHA-256(prev ‖ canonical JSON of the record without "hash")
//
// prev is the previous record's hash as 32 raw bytes (zero for seq 1).
// The canonical JSON is RFC 8785 (JCS) for the values a record can hold;
// canon.go spells out what that means here. Each line of a log file is
// exactly the canonical JSON of the whole record plus a newline, and the
// parser accepts no other spelling, so one byte changed anywhere in a line
// breaks that line.
//
// # Seals and the key
//
// Every SealEvery records, on every clean stop (Close, AppendSealed), and
// before a file is rotated, the writer appends a seal record: a record
// like any other whose "seal" member holds an epoch e and
//
//	mac = HMAC-SHA-256(Ke, canonical JSON of the seal record without "hash" and without "mac")
//
// which covers the seal's seq, its prev (the hash of the last record it
// seals, and through the chain every record before it), its epoch, time
// and actor. Seal epochs run 0, 1, 2, ... with no gap.
//
// The key evolves: K0 is 32 random bytes made on first use, and after
// each seal the writer replaces the sealing state with
// K(e+1) = SHA-256("rayvmm-audit-evolve-v1" ‖ Ke), so the key that made a
// seal is no longer on the host once the seal is written. This is the
// forward-secure scheme of Bellare–Yee and Schneier–Kelsey that
// journald's FSS also follows: someone who takes the host later gets only
// the current key, and cannot forge any seal already made. The sealing
// state (audit-seal.key) also says how many seals have been made, and a
// verifier holding K0 checks that the state's key is K0 stepped that many
// times, so it cannot be rolled back to hide seals cut from the log.
//
// K0 is written once to audit-verify.key (mode 0400) for verification;
// the operator should copy it off the host and delete it there, as
// `journalctl --setup-keys` asks, and then verify with --key. While K0
// stays on the host, root on the host can forge seals (as with any key on
// the host); a copy of the log directory alone (a backup) never can.
//
// Why HMAC-SHA-256 rather than ed25519: the only party that must check
// seals is the operator, who can hold a secret; HMAC is fast (verifying a
// million records is dominated by hashing them), is in the standard
// library, and evolves by one hash. ed25519 would let anyone verify
// without being able to forge, but forward security with signatures
// needs a chain of per-epoch key pairs each certified by the previous
// one (a larger, slower scheme) and a signing key on the host buys
// nothing against root on the host.
//
// The key directory (0700) is outside the log directory, so a copy or
// backup of the log is never a copy of the key.
//
// # Writing
//
// Any number of processes append directly: a writer takes an flock on
// <dir>/lock, finds the end of the log (cached in the lock file and
// checked against the file's size), writes its records with one pwrite,
// fdatasyncs, and only then returns, so a record is on disk before the
// action it describes is reported done. Within one process, concurrent
// Appends are committed together (group commit): one write and one
// fdatasync for every record waiting. A batch with a seal also syncs the
// new sealing state (one more fsync, once per seal).
//
// A writer killed mid-append leaves at most one partial last line. Verify
// reports it as Torn; the next writer writes a Repair record over it
// (naming the bytes dropped and their SHA-256) and cuts what is left, so
// the repair is never silent: a crash during the repair leaves a torn line
// again.
//
// Files rotate by size (MaxFileSize): audit-00000001.jsonl,
// audit-00000002.jsonl, ...; the chain and the seqs run on across files,
// and a file ends with a seal.
//
// # Verifying
//
// Verify reads every file and names the first bad seq and its Kind:
// Edited (does not parse, hash does not match, or does not chain), Deleted
// (a seq gap that is not filled later), Reordered (a seq out of order),
// BadSeal (a MAC that fails or an epoch out of order: the chain was
// recomputed without the key), Truncated (the sealing state has made
// seals the log no longer has) and Torn (a partial last line). Records
// after the last seal are protected by the chain alone until the next
// seal, as in journald.
package audit
