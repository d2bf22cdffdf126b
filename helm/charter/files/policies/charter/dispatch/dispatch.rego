# May this caller send this request to this model version on this node?
#
# Input: {
#   "now": RFC 3339 time,
#   "version": {"id", "model", "state", "license", "approval": {"allowed_regions",
#               "allowed_data_classes", "allowed_purposes", "expires_at"}},
#   "request": {"purpose", "data_class"},
#   "caller": {"team", "entitlements": {"models", "data_classes", "regions"}},
#   "node": {"id", "region", "attested_version_id"}
# }
# Output: decision := {"allow", "violations": [{"code", "msg"}], "warnings": [...]}
package charter.dispatch

import rego.v1

_v := input.version

_approval := _v.approval

_req := input.request

_node := input.node

_ent := input.caller.entitlements

_classes := data.charter.residency.data_classes

_valid_input if {
	_now_ok
	is_object(_v)
	is_string(_v.id)
	is_string(_v.model)
	is_string(_v.state)
	is_object(_req)
	is_string(_req.purpose)
	is_string(_req.data_class)
	is_object(input.caller)
	is_object(_ent)
	is_object(_node)
	is_string(_node.region)
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
	_v.state == "revoked"
}

violations contains {
	"code": "version_not_approved",
	"msg": sprintf("this model version is %v, not approved", [_v.state]),
} if {
	_valid_input
	not _v.state in {"approved", "deprecated", "revoked"}
}

violations contains {
	"code": "approval_missing",
	"msg": "the version has no approval conditions on record",
} if {
	_valid_input
	_v.state in {"approved", "deprecated"}

	# Not `not is_object(_approval)`: OPA makes a rule with an undefined reference under
	# `not` fail, regorus does not. Spelled out, both deny.
	not is_object(object.get(_v, "approval", null))
}

# Ranges spelled out: Go and Rust parse what lies outside them differently (an offset of
# +24:00, second 60), so such a time is malformed here, on every engine.
_rfc3339 := `^[0-9]{4}-(0[1-9]|1[0-2])-(0[1-9]|[12][0-9]|3[01])T([01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9](\.[0-9]+)?(Z|[+-]([01][0-9]|2[0-3]):[0-5][0-9])$`

_time_ok(t) if {
	is_string(t)
	regex.match(_rfc3339, t)
}

violations contains {
	"code": "approval_invalid",
	"msg": "the approval's expiry is not an RFC 3339 time",
} if {
	_valid_input
	is_object(_approval)
	not _time_ok(object.get(_approval, "expires_at", null))
}

# Rules, not function calls, so each regex runs once per decision.
_now_ok if _time_ok(input.now)

_expiry_ok if _time_ok(_approval.expires_at)

violations contains {
	"code": "approval_expired",
	"msg": sprintf("the approval expired at %v", [_approval.expires_at]),
} if {
	_valid_input
	_now_ok
	_expiry_ok
	time.parse_rfc3339_ns(input.now) >= time.parse_rfc3339_ns(_approval.expires_at)
}

warnings contains {
	"code": "version_deprecated",
	"msg": "this model version is deprecated; move to a newer version",
} if {
	_valid_input
	_v.state == "deprecated"
}

# --- purpose ------------------------------------------------------------------------------

violations contains {
	"code": "purpose_not_approved",
	"msg": sprintf("purpose %v is not among the approval's purposes", [_req.purpose]),
} if {
	_valid_input
	is_object(_approval)
	allowed := object.get(_approval, "allowed_purposes", [])
	not _req.purpose in allowed
}

_license := data.charter.licenses[lower(_v.license)] if is_string(_v.license)

_restricted := object.get(data.charter.organisation, ["license_purposes", "use_restrictions"], [])

violations contains {
	"code": "purpose_restricted_by_license",
	"msg": sprintf("the %v license forbids use for %v", [_v.license, _req.purpose]),
} if {
	_valid_input
	_license.use_restrictions == true
	_req.purpose in _restricted
}

violations contains {
	"code": "license_not_commercial",
	"msg": sprintf("the %v license does not allow commercial use", [_v.license]),
} if {
	_valid_input
	_license.commercial_use == false
	data.charter.organisation.commercial_use_required == true
}

# --- data class and residency -------------------------------------------------------------

violations contains {
	"code": "data_class_unknown",
	"msg": sprintf("data class %v is not defined", [_req.data_class]),
} if {
	_valid_input
	is_string(_req.data_class)
	not _classes[_req.data_class]
}

violations contains {
	"code": "residency_violation",
	"msg": sprintf("%v data may not be processed in region %v", [_req.data_class, _node.region]),
} if {
	_valid_input
	regions := _classes[_req.data_class]
	not _node.region in regions
}

violations contains {
	"code": "data_class_not_approved",
	"msg": sprintf("the approval does not cover %v data", [_req.data_class]),
} if {
	_valid_input
	is_object(_approval)
	allowed := object.get(_approval, "allowed_data_classes", [])
	not _req.data_class in allowed
}

violations contains {
	"code": "region_not_approved",
	"msg": sprintf("the approval does not cover region %v", [_node.region]),
} if {
	_valid_input
	is_object(_approval)
	allowed := object.get(_approval, "allowed_regions", [])
	not _node.region in allowed
}

# --- the caller's team --------------------------------------------------------------------

# The caller's team, always defined: a string, or null when the key belongs to no team.
_team := object.get(input.caller, "team", null)

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

_entitled(kind, value) if "*" in object.get(_ent, kind, [])

_entitled(kind, value) if value in object.get(_ent, kind, [])

# The entitlement findings name the team, so they speak only of a caller that has one.
violations contains {
	"code": "team_not_entitled",
	"msg": sprintf("team %v is not entitled to model %v", [_team, _v.model]),
} if {
	_valid_input
	_has_team
	not _entitled("models", _v.model)
}

violations contains {
	"code": "team_data_class_not_entitled",
	"msg": sprintf("team %v may not send %v data", [_team, _req.data_class]),
} if {
	_valid_input
	_has_team
	not _entitled("data_classes", _req.data_class)
}

violations contains {
	"code": "team_region_not_entitled",
	"msg": sprintf("team %v may not use region %v", [_team, _node.region]),
} if {
	_valid_input
	_has_team
	not _entitled("regions", _node.region)
}

# --- the node -----------------------------------------------------------------------------

violations contains {
	"code": "node_not_attested",
	"msg": sprintf("node %v is not attested for this model version", [_node.id]),
} if {
	_valid_input
	object.get(_node, "attested_version_id", null) != _v.id
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
}
