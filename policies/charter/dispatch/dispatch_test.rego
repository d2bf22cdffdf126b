package charter.dispatch_test

import data.charter.dispatch
import rego.v1

_ok := {
	"now": 1780272000, # 2026-06-01T00:00:00Z
	"version": {
		"id": "v1", "model": "TinyLlama", "state": "approved", "license": "apache-2.0",
		"approval": {
			"allowed_regions": ["eu-central", "eu-west"],
			"allowed_data_classes": ["internal", "public"],
			"allowed_purposes": ["assistant"],
			"expires_at": 1798761600, # 2027-01-01T00:00:00Z
		},
	},
	"request": {"purpose": "assistant", "data_class": "internal"},
	"caller": {"team": "helpdesk", "entitlements": {
		"models": ["TinyLlama"], "data_classes": ["*"], "regions": ["*"],
	}},
	"node": {"id": "n1", "region": "eu-central", "attested_version_id": "v1"},
}

_codes(inp) := codes if {
	codes := {v.code | some v in dispatch.decision.violations} with input as inp
}

test_allows_the_happy_path if {
	dispatch.allow with input as _ok
	_codes(_ok) == set()
}

test_denies_malformed_input if {
	not dispatch.allow with input as {}
	_codes({}) == {"input_invalid"}
}

test_denies_revoked if {
	inp := json.patch(_ok, [{"op": "replace", "path": "/version/state", "value": "revoked"}])
	_codes(inp) == {"version_revoked"}
}

test_denies_submitted if {
	inp := json.patch(_ok, [{"op": "replace", "path": "/version/state", "value": "submitted"}])
	"version_not_approved" in _codes(inp)
}

test_deprecated_serves_with_warning if {
	inp := json.patch(_ok, [{"op": "replace", "path": "/version/state", "value": "deprecated"}])
	dispatch.allow with input as inp
	ws := {w.code | some w in dispatch.decision.warnings} with input as inp
	ws == {"version_deprecated"}
}

# The periodic expiry job moves a version whose approval ran out to "expired": not servable,
# even if the clocks disagree and the approval still looks current.
test_denies_expired_state if {
	inp := json.patch(_ok, [{"op": "replace", "path": "/version/state", "value": "expired"}])
	not dispatch.allow with input as inp
	_codes(inp) == {"version_not_approved"}
}

test_denies_expired_state_past_its_expiry if {
	inp := json.patch(_ok, [
		{"op": "replace", "path": "/version/state", "value": "expired"},
		{"op": "replace", "path": "/now", "value": 1798761600},
	])
	_codes(inp) == {"version_not_approved", "approval_expired"}
}

test_denies_expired if {
	inp := json.patch(_ok, [{"op": "replace", "path": "/now", "value": 1798761600}])
	_codes(inp) == {"approval_expired"}
}

test_denies_an_approval_without_expiry if {
	inp := json.patch(_ok, [{"op": "replace", "path": "/version/approval/expires_at", "value": null}])
	_codes(inp) == {"approval_invalid"}
}

# Times are whole seconds: a string, a fraction or a time past 9999 is malformed input.
test_denies_times_that_are_not_epoch_seconds if {
	every t in ["2027-01-01T00:00:00Z", 1798761600.5, 253402300800, -1, true] {
		_codes(json.patch(_ok, [{"op": "replace", "path": "/version/approval/expires_at", "value": t}])) == {"input_invalid"}
		_codes(json.patch(_ok, [{"op": "replace", "path": "/now", "value": t}])) == {"input_invalid"}
	}
}

test_the_expiry_is_exclusive_to_the_second if {
	_codes(json.patch(_ok, [{"op": "replace", "path": "/now", "value": 1798761599}])) == set()
	_codes(json.patch(_ok, [{"op": "replace", "path": "/now", "value": 1798761600}])) == {"approval_expired"}
}

test_denies_purpose if {
	inp := json.patch(_ok, [{"op": "replace", "path": "/request/purpose", "value": "marketing"}])
	_codes(inp) == {"purpose_not_approved"}
}

test_denies_purpose_restricted_by_license if {
	inp := json.patch(_ok, [
		{"op": "replace", "path": "/version/license", "value": "gemma"},
		{"op": "replace", "path": "/request/purpose", "value": "law-enforcement"},
		{"op": "replace", "path": "/version/approval/allowed_purposes", "value": ["law-enforcement"]},
	])
	_codes(inp) == {"purpose_restricted_by_license"}
}

test_denies_residency if {
	inp := json.patch(_ok, [
		{"op": "replace", "path": "/request/data_class", "value": "restricted"},
		{"op": "replace", "path": "/node/region", "value": "eu-west"},
		{"op": "replace", "path": "/version/approval/allowed_data_classes", "value": ["restricted"]},
	])
	_codes(inp) == {"residency_violation"}
}

test_denies_unknown_data_class if {
	inp := json.patch(_ok, [{"op": "replace", "path": "/request/data_class", "value": "secret"}])
	_codes(inp) == {"data_class_unknown", "data_class_not_approved"}
}

test_denies_region_outside_approval if {
	inp := json.patch(_ok, [{"op": "replace", "path": "/node/region", "value": "eu-north"}])
	_codes(inp) == {"region_not_approved"}
}

test_denies_unentitled_team if {
	inp := json.patch(_ok, [{"op": "replace", "path": "/caller/entitlements/models", "value": []}])
	_codes(inp) == {"team_not_entitled"}
}

test_denies_team_data_class if {
	inp := json.patch(_ok, [{"op": "replace", "path": "/caller/entitlements/data_classes", "value": ["public"]}])
	_codes(inp) == {"team_data_class_not_entitled"}
}

test_denies_unattested_node if {
	inp := json.patch(_ok, [{"op": "replace", "path": "/node/attested_version_id", "value": "v0"}])
	_codes(inp) == {"node_not_attested"}
}

test_denies_missing_attestation if {
	inp := json.patch(_ok, [{"op": "remove", "path": "/node/attested_version_id"}])
	_codes(inp) == {"node_not_attested"}
}

test_a_caller_without_a_team_is_told_so if {
	inp := json.patch(_ok, [{"op": "replace", "path": "/caller/team", "value": null}])
	not dispatch.allow with input as inp
	_codes(inp) == {"caller_without_team"}
	some v in dispatch.decision.violations with input as inp
	contains(v.msg, "belongs to no team")
}

test_a_caller_with_no_team_key_at_all_is_told_so if {
	inp := json.patch(_ok, [{"op": "remove", "path": "/caller/team"}])
	_codes(inp) == {"caller_without_team"}
}

test_denies_an_approved_version_without_conditions if {
	inp := json.patch(_ok, [{"op": "replace", "path": "/version/approval", "value": null}])
	_codes(inp) == {"approval_missing"}
}

_msgs(inp) := msgs if {
	msgs := {v.code: v.msg | some v in dispatch.decision.violations} with input as inp
}

test_the_expiry_message_quotes_the_time_for_people if {
	at_expiry := json.patch(_ok, [{"op": "replace", "path": "/now", "value": 1798761600}])
	_msgs(at_expiry).approval_expired == "the approval expired at 1798761600 seconds after the epoch"
	quoted := json.patch(at_expiry, [{"op": "add", "path": "/version/approval/expires_at_utc", "value": "2027-01-01T00:00:00Z"}])
	_msgs(quoted).approval_expired == "the approval expired at 2027-01-01T00:00:00Z"
}

test_denies_a_non_commercial_license if {
	inp := json.patch(_ok, [{"op": "replace", "path": "/version/license", "value": "cc-by-nc-4.0"}])
	"license_not_commercial" in _codes(inp)
}

test_denies_a_team_outside_its_regions if {
	inp := json.patch(_ok, [{"op": "replace", "path": "/caller/entitlements/regions", "value": ["eu-west"]}])
	_codes(inp) == {"team_region_not_entitled"}
}

_derived(lineage) := json.patch(_ok, [{"op": "add", "path": "/version/lineage", "value": lineage}])

test_a_derived_version_serves_while_its_bases_do if {
	dispatch.allow with input as _derived([{"id": "b1", "state": "approved"}, {"id": "b0", "state": "deprecated"}])
}

test_a_revoked_base_suspends_its_derivatives if {
	inp := _derived([{"id": "b1", "state": "revoked"}])
	_codes(inp) == {"base_version_revoked"}
	msgs := {v.msg | some v in dispatch.decision.violations} with input as inp
	msgs == {"this version derives from version b1, which has been revoked"}
}

test_any_ancestor_not_approved_suspends if {
	_codes(_derived([{"id": "b1", "state": "approved"}, {"id": "b0", "state": "submitted"}])) == {"base_version_not_approved"}
}

test_a_malformed_lineage_denies if {
	_codes(_derived("b1")) == {"input_invalid"}
	_codes(_derived([{"id": "b1"}])) == {"input_invalid"}
}

_carrying(findings) := json.patch(_ok, [{"op": "add", "path": "/request/findings", "value": findings}])

test_a_card_number_under_internal_is_refused if {
	inp := _carrying([{"type": "CREDIT_CARD", "count": 2}])
	_codes(inp) == {"content_not_permitted"}
	msgs := {v.msg | some v in dispatch.decision.violations} with input as inp
	msgs == {"the request carries 2 of CREDIT_CARD, which internal data may not"}
}

test_what_a_class_permits_passes if {
	dispatch.allow with input as _carrying([{"type": "EMAIL_ADDRESS", "count": 1}])
	dispatch.allow with input as _carrying([])
}

_obligations(inp) := o if {
	o := dispatch.decision.obligations with input as inp
}

test_what_a_class_redacts_is_an_obligation if {
	inp := _carrying([{"type": "EMAIL_ADDRESS", "count": 2}, {"type": "IBAN_CODE", "count": 1}])
	dispatch.allow with input as inp
	_obligations(inp).redact == ["EMAIL_ADDRESS"]
}

test_nothing_redacted_without_findings if {
	_obligations(_ok) == {"redact": [], "redact_response": []}
	_obligations(_carrying([])).redact == []
}

test_answers_are_redacted_only_for_inspected_requests if {
	_obligations(_carrying([])).redact_response == ["AWS_ACCESS_KEY", "CHARTER_API_KEY", "CREDIT_CARD", "GITHUB_TOKEN", "GOOGLE_API_KEY", "OPENAI_API_KEY", "PRIVATE_KEY", "SLACK_TOKEN"]
	_obligations(_ok).redact_response == []
}

_in_north(inp) := json.patch(inp, [
	{"op": "replace", "path": "/node/region", "value": "eu-north"},
	{"op": "replace", "path": "/version/approval/allowed_regions", "value": ["eu-central", "eu-north"]},
])

test_a_finding_may_require_a_stricter_residency if {
	dispatch.allow with input as _in_north(_carrying([{"type": "EMAIL_ADDRESS", "count": 1}]))
	inp := _in_north(_carrying([{"type": "IBAN_CODE", "count": 1}]))
	_codes(inp) == {"content_residency_violation"}
	msgs := {v.msg | some v in dispatch.decision.violations} with input as inp
	msgs == {"the request carries IBAN_CODE, which is handled as confidential data: not in region eu-north"}
	dispatch.allow with input as _carrying([{"type": "IBAN_CODE", "count": 1}])
}

test_what_is_redacted_needs_no_stricter_residency if {
	inp := _in_north(_carrying([{"type": "IBAN_CODE", "count": 1}]))
	dispatch.allow with input as inp with data.charter.inspection.redact as {"internal": ["IBAN_CODE"]}
}

test_malformed_findings_deny if {
	_codes(_carrying([{"type": "CREDIT_CARD", "count": 0}])) == {"input_invalid"}
	_codes(_carrying({"CREDIT_CARD": 2})) == {"input_invalid"}
}

test_a_base_whose_approval_ended_suspends_before_the_sweep if {
	inp := _derived([{"id": "b1", "state": "approved", "expires_at": 1780000000, "expires_at_utc": "2026-05-28T20:26:40Z"}])
	_codes(inp) == {"base_approval_expired"}
	msgs := {v.msg | some v in dispatch.decision.violations} with input as inp
	msgs == {"this version derives from version b1, whose approval expired at 2026-05-28T20:26:40Z"}
	dispatch.allow with input as _derived([{"id": "b1", "state": "approved", "expires_at": 1798761600}])
}
