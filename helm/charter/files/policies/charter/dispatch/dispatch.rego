# May this caller send this request to this model version on this node?
#
# Input (schemas/dispatch.input.json; Charter checks it before any engine): {
#   "now": seconds since the epoch,
#   "version": {"id", "model", "state", "license", "approval": {"allowed_regions",
#               "allowed_data_classes", "allowed_purposes", "expires_at" (seconds)},
#               "lineage": [{"id", "state", "expires_at" (seconds or null)}: the versions
#                           it derives from, nearest first]},
#   "request": {"purpose", "data_class", "findings": [{"type", "count"}] (only when the
#               request's content was inspected: types and counts, never the text)},
#   "caller": {"team", "entitlements": {"models", "data_classes", "regions"}},
#   "node": {"id", "region", "attested_version_id"}
# }
# Output: decision := {"allow", "violations": [{"code", "msg"}], "warnings": [...],
#   "obligations": {"redact": [types], "redact_response": [types]}}: what the gateway must
#   do to serve an allowed request (charter.inspection): replace the request's findings of
#   these types before it is sent, and those of these types in the answer. The gateway
#   refuses a decision whose obligations it does not understand.
#
# Written to decide alike on every engine (docs/policy.md, "Rego style"): input is read
# only through `object.get` on values known to be objects; `_valid_input` checks every type
# a rule relies on and every other rule starts with it; times are integers and identifiers
# arrive canonical (charter.identifiers), so no built-in parses, lowercases or can fail.
package charter.dispatch

import rego.v1

_classes := data.charter.residency.data_classes

# --- reading the input: every value below is defined, whatever the input ---------------

_input := input if is_object(input)
else := {}

_object(x) := x if is_object(x)
else := {}

_array(x) := x if is_array(x)
else := []

_v := _object(object.get(_input, "version", null))

_approval := object.get(_v, "approval", null) # an object, or null: no approval on record

_conditions := _object(_approval)

_req := _object(object.get(_input, "request", null))

_caller := _object(object.get(_input, "caller", null))

_ent := _object(object.get(_caller, "entitlements", null))

_node := _object(object.get(_input, "node", null))

_now := object.get(_input, "now", null)

_expiry := object.get(_conditions, "expires_at", null)

_state := object.get(_v, "state", "")

_purpose := object.get(_req, "purpose", "")

_data_class := object.get(_req, "data_class", "")

_region := object.get(_node, "region", "")

_model := object.get(_v, "model", "")

# --- input shape: anything malformed denies -------------------------------------------

# Seconds since the epoch, 1970 to 9999 (charter.identifiers.EPOCH_MAX), whole.
_epoch(t) if {
	is_number(t)
	t >= 0
	t <= 253402300799
	floor(t) == t
}

_string_or_null(o, key) if object.get(o, key, null) == null

_string_or_null(o, key) if is_string(object.get(o, key, null))

_strings(xs) if {
	is_array(xs)
	every x in xs {
		is_string(x)
	}
}

# The versions this one derives from (an adapter's base, a quantized build's source).
_lineage := object.get(_v, "lineage", [])

_ancestor_ok(a) if {
	is_object(a)
	is_string(object.get(a, "id", null))
	is_string(object.get(a, "state", null))
	_ancestor_expiry_ok(object.get(a, "expires_at", null))
}

_ancestor_expiry_ok(e) if e == null

_ancestor_expiry_ok(e) if _epoch(e)

_lineage_ok if {
	is_array(_lineage)
	every a in _array(_lineage) {
		_ancestor_ok(a)
	}
}

# What inspection found in the request (charter.inspection): absent when not inspected.
_findings := _array(object.get(_req, "findings", null))

_finding_ok(f) if {
	is_object(f)
	is_string(object.get(f, "type", null))
	_whole(object.get(f, "count", null))
}

_whole(n) if {
	is_number(n)
	n >= 1
	n <= 9007199254740991
	floor(n) == n
}

_findings_ok if object.get(_req, "findings", null) == null

_findings_ok if {
	is_array(object.get(_req, "findings", null))
	every f in _findings {
		_finding_ok(f)
	}
}

_approval_ok if _approval == null

_approval_ok if {
	is_object(_approval)
	_strings(object.get(_conditions, "allowed_regions", []))
	_strings(object.get(_conditions, "allowed_data_classes", []))
	_strings(object.get(_conditions, "allowed_purposes", []))
	_expiry_ok
}

_expiry_ok if _expiry == null

_expiry_ok if _epoch(_expiry)

_valid_input if {
	_epoch(_now)
	is_object(object.get(_input, "version", null))
	is_string(object.get(_v, "id", null))
	is_string(_model)
	is_string(_state)
	_string_or_null(_v, "license")
	_approval_ok
	_lineage_ok
	is_object(object.get(_input, "request", null))
	is_string(_purpose)
	is_string(_data_class)
	_findings_ok
	is_object(object.get(_input, "caller", null))
	_string_or_null(_caller, "team")
	is_object(object.get(_caller, "entitlements", null))
	_strings(object.get(_ent, "models", []))
	_strings(object.get(_ent, "data_classes", []))
	_strings(object.get(_ent, "regions", []))
	is_object(object.get(_input, "node", null))
	is_string(object.get(_node, "id", null))
	is_string(_region)
	_string_or_null(_node, "attested_version_id")
}

violations contains {"code": "input_invalid", "msg": "the dispatch input is malformed"} if {
	not _valid_input
}

# --- the version and its approval ---------------------------------------------------------

violations contains {
	"code": "version_revoked",
	"msg": "this model version has been revoked",
} if {
	_valid_input
	_state == "revoked"
}

violations contains {
	"code": "version_not_approved",
	"msg": sprintf("this model version is %v, not approved", [_state]),
} if {
	_valid_input
	not _state in {"approved", "deprecated", "revoked"}
}

_has_approval if is_object(_approval)

# A derived version serves only while every version it derives from does: revoking a
# base suspends its adapters and builds here, without touching their own state.
_serving_state(s) if s in {"approved", "deprecated"}

violations contains {
	"code": "base_version_revoked",
	"msg": sprintf("this version derives from version %v, which has been revoked", [object.get(a, "id", "")]),
} if {
	_valid_input
	some a in _array(_lineage)
	object.get(a, "state", "") == "revoked"
}

violations contains {
	"code": "base_approval_expired",
	"msg": sprintf("this version derives from version %v, whose approval expired at %v", [object.get(a, "id", ""), _ended(a)]),
} if {
	_valid_input
	some a in _array(_lineage)
	_epoch(object.get(a, "expires_at", null))
	_now >= object.get(a, "expires_at", 0)
}

_ended(a) := text if {
	text := object.get(a, "expires_at_utc", null)
	is_string(text)
} else := sprintf("%v seconds after the epoch", [object.get(a, "expires_at", 0) + 0])

violations contains {
	"code": "base_version_not_approved",
	"msg": sprintf("this version derives from version %v, which is %v, not approved", [object.get(a, "id", ""), object.get(a, "state", "")]),
} if {
	_valid_input
	some a in _array(_lineage)
	state := object.get(a, "state", "")
	state != "revoked"
	not _serving_state(state)
}

violations contains {
	"code": "approval_missing",
	"msg": "the version has no approval conditions on record",
} if {
	_valid_input
	_state in {"approved", "deprecated"}
	not _has_approval
}

violations contains {
	"code": "approval_invalid",
	"msg": "the approval states no expiry",
} if {
	_valid_input
	_has_approval
	_expiry == null
}

# The clock reads (charter.policy.cache relies on them being only these two, against
# expiries): all are whole seconds.
violations contains {
	"code": "approval_expired",
	"msg": sprintf("the approval expired at %v", [_expiry_text]),
} if {
	_valid_input
	_has_approval
	_epoch(_expiry)
	_now >= _expiry
}

# For people: the expiry as Charter wrote it beside the seconds (RFC 3339), else the seconds.
_expiry_text := text if {
	text := object.get(_conditions, "expires_at_utc", null)
	is_string(text)
} else := sprintf("%v seconds after the epoch", [_expiry + 0]) if {
	# + 0: a -0.0 prints as 0 on every engine (regorus would print "-0")
	is_number(_expiry)
}

warnings contains {
	"code": "version_deprecated",
	"msg": "this model version is deprecated; move to a newer version",
} if {
	_valid_input
	_state == "deprecated"
}

# --- purpose ------------------------------------------------------------------------------

_allows(kind, value) if value in _array(object.get(_conditions, kind, null))

violations contains {
	"code": "purpose_not_approved",
	"msg": sprintf("purpose %v is not among the approval's purposes", [_purpose]),
} if {
	_valid_input
	_has_approval
	not _allows("allowed_purposes", _purpose)
}

_license_id := object.get(_v, "license", null)

_license := object.get(data.charter.licenses, _license_id, {}) if is_string(_license_id)
else := {}

_restricted := _array(object.get(data.charter.organisation, ["license_purposes", "use_restrictions"], null))

violations contains {
	"code": "purpose_restricted_by_license",
	"msg": sprintf("the %v license forbids use for %v", [_license_id, _purpose]),
} if {
	_valid_input
	object.get(_license, "use_restrictions", null) == true
	_purpose in _restricted
}

violations contains {
	"code": "license_not_commercial",
	"msg": sprintf("the %v license does not allow commercial use", [_license_id]),
} if {
	_valid_input
	object.get(_license, "commercial_use", null) == false
	object.get(data.charter.organisation, "commercial_use_required", false) == true
}

# --- data class and residency -------------------------------------------------------------

_known_class if is_array(object.get(_classes, _data_class, null))

_class_regions := _array(object.get(_classes, _data_class, null))

violations contains {
	"code": "data_class_unknown",
	"msg": sprintf("data class %v is not defined", [_data_class]),
} if {
	_valid_input
	not _known_class
}

_resident if _region in _class_regions

violations contains {
	"code": "residency_violation",
	"msg": sprintf("%v data may not be processed in region %v", [_data_class, _region]),
} if {
	_valid_input
	_known_class
	not _resident
}

violations contains {
	"code": "data_class_not_approved",
	"msg": sprintf("the approval does not cover %v data", [_data_class]),
} if {
	_valid_input
	_has_approval
	not _allows("allowed_data_classes", _data_class)
}

violations contains {
	"code": "region_not_approved",
	"msg": sprintf("the approval does not cover region %v", [_region]),
} if {
	_valid_input
	_has_approval
	not _allows("allowed_regions", _region)
}

# --- what the request carries --------------------------------------------------------------

# The finding types each data class may not carry (data.charter.inspection.deny).
_inspection := data.charter.inspection if is_object(data.charter.inspection)
else := {}

_forbidden := _array(object.get(_object(object.get(_inspection, "deny", null)), _data_class, null))

violations contains {
	"code": "content_not_permitted",
	"msg": sprintf("the request carries %v of %v, which %v data may not", [object.get(f, "count", 0) + 0, object.get(f, "type", ""), _data_class]),
} if {
	_valid_input
	some f in _findings
	object.get(f, "type", "") in _forbidden
}

# The finding types replaced before the request is sent (data.charter.inspection.redact):
# what is replaced is not sent, so no rule below asks where it may go.
_redactable := _array(object.get(_object(object.get(_inspection, "redact", null)), _data_class, null))

_redacts(t) if t in _redactable

_redacted contains t if {
	_valid_input
	some f in _findings
	t := object.get(f, "type", "")
	_redacts(t)
}

# A finding sent as it is may be processed only where the data class it is treated as may
# be (data.charter.inspection.residency: type -> data class): a stricter residency than
# the request's label, which the gateway meets by trying the regions that meet it.
_content_classes := _object(object.get(_inspection, "residency", null))

violations contains {
	"code": "content_residency_violation",
	"msg": sprintf("the request carries %v, which is handled as %v data: not in region %v", [t, cls, _region]),
} if {
	_valid_input
	some f in _findings
	t := object.get(f, "type", "")
	not _redacts(t)
	cls := object.get(_content_classes, t, null)
	is_string(cls)
	not _region_holds(cls)
}

_region_holds(cls) if _region in _array(object.get(_classes, cls, null))

# The finding types replaced in the answer (data.charter.inspection.responses), for a
# request whose content was inspected.
_inspected if is_array(object.get(_req, "findings", null))

_response_types contains t if {
	_valid_input
	_inspected
	some t in _array(object.get(_object(object.get(_inspection, "responses", null)), _data_class, null))
	is_string(t)
}

# --- the caller's team --------------------------------------------------------------------

# The caller's team, always defined: a string, or null when the key belongs to no team.
_team := object.get(_caller, "team", null)

_has_team if {
	is_string(_team)
	_team != ""
}

violations contains {
	"code": "caller_without_team",
	"msg": "this key belongs to no team; the gateway needs a team member's key or a service account",
} if {
	_valid_input
	not _has_team
}

_entitled(kind, value) if "*" in _array(object.get(_ent, kind, null))

_entitled(kind, value) if value in _array(object.get(_ent, kind, null))

# The entitlement findings name the team, so they speak only of a caller that has one.
violations contains {
	"code": "team_not_entitled",
	"msg": sprintf("team %v is not entitled to model %v", [_team, _model]),
} if {
	_valid_input
	_has_team
	not _entitled("models", _model)
}

violations contains {
	"code": "team_data_class_not_entitled",
	"msg": sprintf("team %v may not send %v data", [_team, _data_class]),
} if {
	_valid_input
	_has_team
	not _entitled("data_classes", _data_class)
}

violations contains {
	"code": "team_region_not_entitled",
	"msg": sprintf("team %v may not use region %v", [_team, _region]),
} if {
	_valid_input
	_has_team
	not _entitled("regions", _region)
}

# --- the node -----------------------------------------------------------------------------

violations contains {
	"code": "node_not_attested",
	"msg": sprintf("node %v is not attested for this model version", [object.get(_node, "id", "")]),
} if {
	_valid_input
	object.get(_node, "attested_version_id", null) != object.get(_v, "id", null)
}

default allow := false

allow if {
	_valid_input
	count(violations) == 0
}

decision := {
	"allow": allow,
	"violations": [v | some v in violations],
	"warnings": [w | some w in warnings],
	"obligations": {
		"redact": [t | some t in _redacted],
		"redact_response": [t | some t in _response_types],
	},
}
