package charter.admission_test

import data.charter.admission
import rego.v1

_ok := {
	"version": {
		"model": "TinyLlama-1.1B-Chat-v1.0", "publisher": "TinyLlama",
		"source_repo": "TinyLlama/TinyLlama-1.1B-Chat-v1.0",
		"source_revision": "fe8a4ea1ffedaf415f4da2f062534de366a451e6",
		"weight_format": "safetensors", "unsafe_weights": false,
		"files": [
			{"path": "model.safetensors", "kind": "weights", "size": 10, "sha256": "abababababababababababababababababababababababababababababababab"},
			{"path": "config.json", "kind": "config", "size": 1, "sha256": "cdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcd"},
		],
		"license_declared": "apache-2.0", "license_card": "apache-2.0",
		"base_model": "TinyLlama/TinyLlama-1.1B-intermediate-step-1431k-3T",
		"derivation": "fine_tune",
		"datasets": ["cerebras/SlimPajama-627B"],
		"storage_region": "eu-central", "hosting_regions": ["eu-central"],
	},
	"lineage": {"base_model_approved": false},
}

_codes(inp) := codes if {
	codes := {v.code | some v in admission.decision.violations} with input as inp
}

_warnings(inp) := codes if {
	codes := {w.code | some w in admission.decision.warnings} with input as inp
}

_set(path, value) := json.patch(_ok, [{"op": "replace", "path": path, "value": value}])

test_allows_a_complete_version if {
	admission.allow with input as _ok
	_codes(_ok) == set()
	_warnings(_ok) == set()
}

test_denies_malformed_input if {
	not admission.allow with input as {"version": "x"}
	_codes({"version": "x"}) == {"input_invalid"}
}

test_branch_is_not_a_pin if {
	_codes(_set("/version/source_revision", "main")) == {"revision_not_pinned"}
	_codes(_set("/version/source_revision", null)) == {"revision_not_pinned"}
}

test_sha256_revision_is_a_pin if {
	rev := "0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a"
	_codes(_set("/version/source_revision", rev)) == set()
}

test_weight_file_needs_digest if {
	inp := json.patch(_ok, [{"op": "replace", "path": "/version/files/0/sha256", "value": null}])
	_codes(inp) == {"file_digest_missing"}
}

test_metadata_only_version_is_not_admissible if {
	_codes(_set("/version/files", [])) == {"no_weight_files"}
}

test_pickle_weights if {
	_codes(_set("/version/unsafe_weights", true)) == {"pickle_weights"}
}

test_license_missing if {
	_codes(json.patch(_ok, [{"op": "remove", "path": "/version/license_declared"}])) == {"license_missing"}
}

test_license_unknown if {
	inp := json.patch(_ok, [
		{"op": "replace", "path": "/version/license_declared", "value": "wtfpl-9"},
		{"op": "replace", "path": "/version/license_card", "value": "wtfpl-9"},
	])
	_codes(inp) == {"license_unknown"}
}

# Charter folds case before the policy sees an id (charter.identifiers): the policy
# compares exactly, as every engine does alike.
test_license_ids_are_compared_exactly if {
	_codes(_set("/version/license_card", "mit")) == {"license_mismatch"}
	_codes(_set("/version/license_card", "Apache-2.0")) == {"license_mismatch"}
}

test_non_commercial_license if {
	inp := json.patch(_ok, [
		{"op": "replace", "path": "/version/license_declared", "value": "cc-by-nc-4.0"},
		{"op": "replace", "path": "/version/license_card", "value": "cc-by-nc-4.0"},
	])
	_codes(inp) == {"license_not_commercial"}
}

test_user_threshold if {
	inp := json.patch(_ok, [
		{"op": "replace", "path": "/version/license_declared", "value": "llama3"},
		{"op": "replace", "path": "/version/license_card", "value": "llama3"},
	])
	_codes(inp) == set()
	_codes(inp) == {"license_user_threshold"} with data.charter.organisation.monthly_active_users as 800000000
}

test_use_restrictions_when_not_accepted if {
	inp := json.patch(_ok, [
		{"op": "replace", "path": "/version/license_declared", "value": "gemma"},
		{"op": "replace", "path": "/version/license_card", "value": "gemma"},
	])
	_codes(inp) == set()
	_codes(inp) == {"license_use_restrictions"} with data.charter.organisation.accept_use_restrictions as false
}

test_publisher_allowlist if {
	_codes(_set("/version/publisher", "someone")) == {"publisher_not_allowed"}
}

test_fine_tune_needs_base_model if {
	_codes(json.patch(_ok, [{"op": "remove", "path": "/version/base_model"}])) == {"base_model_missing"}
}

test_base_model_must_be_known_or_approved if {
	inp := _set("/version/base_model", "someone/secret-base")
	_codes(inp) == {"base_model_unknown"}
	approved := json.patch(inp, [{"op": "replace", "path": "/lineage/base_model_approved", "value": true}])
	_codes(approved) == set()
}

test_storage_region if {
	_codes(_set("/version/storage_region", "us-east")) == {"storage_region_not_sovereign"}
	_codes(_set("/version/storage_region", "moon")) == {"storage_region_not_sovereign"}
	_codes(_set("/version/storage_region", null)) == {"storage_region_missing"}
}

test_warnings_do_not_block if {
	inp := json.patch(_ok, [
		{"op": "replace", "path": "/version/datasets", "value": []},
		{"op": "replace", "path": "/version/hosting_regions", "value": ["eu-central", "us-east"]},
		{"op": "replace", "path": "/version/derivation", "value": "unknown"},
	])
	admission.allow with input as inp
	_warnings(inp) == {"datasets_missing", "hosting_region_not_sovereign", "derivation_unknown"}
}

test_a_card_without_a_license_is_a_warning if {
	inp := _set("/version/license_card", null)
	_codes(inp) == set()
	_warnings(inp) == {"license_card_missing"}
}

# --- evaluation evidence (data.charter.evidence: arc_easy acc >= 500000 ppm, 365 days, for
# high-risk versions) -------------------------------------------------------------------

_now := 1765000000

_arc(ppm, at) := {"task": "arc_easy", "metric": "acc", "filter": "none", "value_ppm": ppm,
	"evaluated_at": at, "attached_at": _now}

_high(evals) := json.patch(_ok, [
	{"op": "add", "path": "/version/risk_tier", "value": "high"},
	{"op": "add", "path": "/now", "value": _now},
	{"op": "add", "path": "/evaluations", "value": evals},
])

_messages(inp) := msgs if {
	msgs := {v.msg | some v in admission.decision.violations} with input as inp
}

test_a_high_risk_version_needs_its_evidence if {
	_codes(_high([])) == {"evaluation_missing"}
	_messages(_high([])) == {concat("", [
		"no result of arc_easy acc (filter none) is attached; requirement ",
		"high-risk-reasoning asks for one",
	])}
	other := {"task": "arc_easy", "metric": "acc_norm", "filter": "none", "value_ppm": 900000,
		"evaluated_at": null, "attached_at": _now}
	_codes(_high([other])) == {"evaluation_missing"}
}

test_evidence_at_or_above_the_threshold_admits if {
	_codes(_high([_arc(500000, _now)])) == set()
	_codes(_high([_arc(451200, _now), _arc(756300, null)])) == set()
}

test_evidence_below_the_threshold_is_shown_with_its_numbers if {
	inp := _high([_arc(451200, _now), _arc(499999, _now - 86400)])
	_codes(inp) == {"evaluation_below_threshold"}
	_messages(inp) == {concat("", [
		"arc_easy acc (filter none) is 499999 ppm at best; requirement high-risk-reasoning ",
		"needs at least 500000 ppm",
	])}
}

test_stale_evidence_does_not_count if {
	year := 365 * 86400
	_codes(_high([_arc(900000, _now - year - 1)])) == {"evaluation_stale"}
	_codes(_high([_arc(900000, _now - year)])) == set()
	# a stale pass beside a fresh failure: below the threshold, as read among fresh results
	_codes(_high([_arc(900000, _now - year - 1), _arc(100000, _now)])) == {"evaluation_below_threshold"}
}

test_evidence_is_not_asked_of_other_tiers if {
	inp := json.patch(_high([]), [{"op": "replace", "path": "/version/risk_tier", "value": "limited"}])
	_codes(inp) == set()
}

test_malformed_evidence_is_input_invalid if {
	_codes(_high([{"task": "arc_easy"}])) == {"input_invalid"}
	_codes(_high("x")) == {"input_invalid"}
	inp := json.patch(_high([]), [{"op": "replace", "path": "/now", "value": "today"}])
	_codes(inp) == {"input_invalid"}
}

test_custom_code_is_denied_unless_the_organisation_allows_it if {
	inp := json.patch(_ok, [{"op": "add", "path": "/version/custom_code", "value": true}])
	_codes(inp) == {"custom_code"}
	allowed := {v.code | some v in admission.decision.violations} with input as inp
		with data.charter.organisation.allow_custom_code as true
	allowed == set()
	_codes(json.patch(_ok, [{"op": "add", "path": "/version/custom_code", "value": "yes"}])) == {"input_invalid"}
}

_restricted_only := [{"id": "restricted-data", "data_classes": ["restricted"], "task": "arc_easy",
	"metric": "acc", "filter": "none", "min_ppm": 600000}]

test_evidence_can_be_asked_of_an_approval_by_its_data_classes if {
	base := json.patch(_ok, [
		{"op": "add", "path": "/now", "value": _now},
		{"op": "add", "path": "/evaluations", "value": [_arc(550000, _now)]},
	])
	restricted := json.patch(base, [{"op": "add", "path": "/data_classes", "value": ["internal", "restricted"]}])
	internal := json.patch(base, [{"op": "add", "path": "/data_classes", "value": ["internal"]}])
	codes_restricted := {v.code | some v in admission.decision.violations} with input as restricted
		with data.charter.evidence.requirements as _restricted_only
	codes_restricted == {"evaluation_below_threshold"}
	codes_internal := {v.code | some v in admission.decision.violations} with input as internal
		with data.charter.evidence.requirements as _restricted_only
	codes_internal == set()
	codes_submit := {v.code | some v in admission.decision.violations} with input as base
		with data.charter.evidence.requirements as _restricted_only
	codes_submit == set()
	_codes(json.patch(base, [{"op": "add", "path": "/data_classes", "value": [3]}])) == {"input_invalid"}
}

test_a_derived_version_needs_its_linked_base_approved if {
	linked := json.patch(_ok, [{"op": "replace", "path": "/lineage",
		"value": {"base_model_approved": false, "base_version_state": "revoked"}}])
	_codes(linked) == {"base_version_not_approved"}
	approved := json.patch(_ok, [{"op": "replace", "path": "/lineage",
		"value": {"base_model_approved": true, "base_version_state": "approved"}}])
	_codes(approved) == set()
	bad := json.patch(_ok, [{"op": "replace", "path": "/lineage",
		"value": {"base_version_state": 7}}])
	_codes(bad) == {"input_invalid"}
}
