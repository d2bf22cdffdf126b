# May this model version be approved?
#
# Input: {"version": {...registry fields...},
#         "lineage": {"base_model_approved": bool, "base_version_state": state or absent},
#         "now": epoch seconds, "evaluations": [{"task", "metric", "filter", "value_ppm",
#         "evaluated_at", "attached_at"}]},
#        as schemas/admission.input.json states it (Charter checks that before any engine).
# Data:  data.charter.licenses, data.charter.residency, data.charter.organisation,
#        data.charter.evidence (evaluation results a version must have, per risk tier)
# Output: decision := {"allow", "violations": [{"code", "msg"}], "warnings": [{"code", "msg"}]}
#
# Written to decide alike on every engine (docs/policy.md, "Rego style"): input is read
# only through `object.get` on values known to be objects; `_valid_input` checks every type
# a rule relies on and every other rule starts with it; no built-in that can fail on input
# (identifiers arrive canonical, in lower case, from charter.identifiers).
package charter.admission

import rego.v1

_org := data.charter.organisation

_licenses := data.charter.licenses

_zones := data.charter.residency.zones

_derived := {"fine_tune", "adapter", "quantized", "merge"}

# --- reading the input: every value below is defined, whatever the input ---------------

_input := input if is_object(input)
else := {}

_object(x) := x if is_object(x)
else := {}

_array(x) := x if is_array(x)
else := []

_v := _object(object.get(_input, "version", null))

_lineage := _object(object.get(_input, "lineage", null))

_files := _array(object.get(_v, "files", null))

_publisher := object.get(_v, "publisher", null)

_storage_region := object.get(_v, "storage_region", null)

_hosting_regions := _array(object.get(_v, "hosting_regions", null))

_derivation := object.get(_v, "derivation", null)

_evaluations := _array(object.get(_input, "evaluations", null))

_now := object.get(_input, "now", null)

# --- input shape: anything malformed denies -------------------------------------------

_string_or_null(o, key) if object.get(o, key, null) == null

_string_or_null(o, key) if is_string(object.get(o, key, null))

_strings(xs) if {
	is_array(xs)
	every x in xs {
		is_string(x)
	}
}

_file_ok(f) if {
	is_object(f)
	is_string(object.get(f, "path", null))
	_string_or_null(f, "sha256")
	_string_or_null(f, "kind")
}

_lineage_ok if object.get(_input, "lineage", null) == null

_lineage_ok if {
	is_object(object.get(_input, "lineage", null))
	is_boolean(object.get(_lineage, "base_model_approved", false))
	_string_or_null(_lineage, "base_version_state")
}

_number_or_null(o, key) if object.get(o, key, null) == null

_number_or_null(o, key) if is_number(object.get(o, key, null))

_evaluation_ok(e) if {
	is_object(e)
	is_string(object.get(e, "task", null))
	is_string(object.get(e, "metric", null))
	is_string(object.get(e, "filter", null))
	is_number(object.get(e, "value_ppm", null))
	is_number(object.get(e, "attached_at", null))
	_number_or_null(e, "evaluated_at")
}

_evaluations_ok if object.get(_input, "evaluations", null) == null

_evaluations_ok if {
	is_array(object.get(_input, "evaluations", null))
	every e in _evaluations {
		_evaluation_ok(e)
	}
}

_valid_input if {
	is_object(object.get(_input, "version", null))
	is_string(_publisher)
	is_boolean(object.get(_v, "unsafe_weights", null))
	is_boolean(object.get(_v, "custom_code", false))
	is_array(object.get(_v, "files", null))
	every f in _files {
		_file_ok(f)
	}
	_strings(object.get(_v, "datasets", null))
	_strings(object.get(_v, "hosting_regions", []))
	_string_or_null(_v, "source_revision")
	_string_or_null(_v, "license_declared")
	_string_or_null(_v, "license_card")
	_string_or_null(_v, "base_model")
	_string_or_null(_v, "derivation")
	_string_or_null(_v, "storage_region")
	_lineage_ok
	_evaluations_ok
	_number_or_null(_input, "now")
	_strings(object.get(_input, "data_classes", []))
}

violations contains {"code": "input_invalid", "msg": "the admission input is malformed"} if {
	not _valid_input
}

# --- pinning and integrity --------------------------------------------------------------

_revision := object.get(_v, "source_revision", null)

_pinned if {
	is_string(_revision)
	regex.match(`^([0-9a-f]{40}|[0-9a-f]{64})$`, _revision)
}

violations contains {
	"code": "revision_not_pinned",
	"msg": sprintf("source revision %v is not a commit hash (a branch or tag can move)", [_revision]),
} if {
	_valid_input
	not _pinned
}

_weight_files := [f | some f in _files; object.get(f, "kind", null) == "weights"]

violations contains {
	"code": "no_weight_files",
	"msg": "no weight files are listed, so nothing pins what would be served",
} if {
	_valid_input
	count(_weight_files) == 0
}

_has_digest(f) if {
	digest := object.get(f, "sha256", null)
	is_string(digest)
	regex.match(`^[0-9a-f]{64}$`, digest)
}

violations contains {
	"code": "file_digest_missing",
	"msg": sprintf("%v has no SHA-256 digest", [object.get(f, "path", "")]),
} if {
	_valid_input
	some f in _files
	not _has_digest(f)
}

violations contains {
	"code": "pickle_weights",
	"msg": "pickle-based weight files execute code when loaded; convert them to safetensors",
} if {
	_valid_input
	object.get(_v, "unsafe_weights", false) == true
}

violations contains {
	"code": "custom_code",
	"msg": "the model ships code its loaders would run (Python files or auto_map in config.json); this organisation does not allow it",
} if {
	_valid_input
	object.get(_v, "custom_code", false) == true
	object.get(_org, "allow_custom_code", false) != true
}

# --- license ------------------------------------------------------------------------------

_declared := object.get(_v, "license_declared", null)

_card := object.get(_v, "license_card", null)

_has_declared if is_string(_declared)

_has_card if is_string(_card)

_license := object.get(_licenses, _declared, {}) if _has_declared
else := {}

violations contains {"code": "license_missing", "msg": "the submitter declared no license"} if {
	_valid_input
	not _has_declared
}

_known_license if {
	_has_declared
	is_object(object.get(_licenses, _declared, null))
}

violations contains {
	"code": "license_unknown",
	"msg": sprintf("license %v is not in the license catalog", [_declared]),
} if {
	_valid_input
	_has_declared
	not _known_license
}

violations contains {
	"code": "license_mismatch",
	"msg": sprintf("declared license %v differs from the model card's %v", [_declared, _card]),
} if {
	_valid_input
	_has_declared
	_has_card
	_declared != _card
}

violations contains {
	"code": "license_not_commercial",
	"msg": sprintf("%v does not allow commercial use, which this organisation needs", [_declared]),
} if {
	_valid_input
	object.get(_org, "commercial_use_required", false) == true
	object.get(_license, "commercial_use", null) == false
}

_threshold := object.get(_license, "user_threshold", null)

violations contains {
	"code": "license_user_threshold",
	"msg": sprintf(
		"%v needs a separate license above %v monthly users; the organisation has %v",
		[_declared, _threshold, object.get(_org, "monthly_active_users", 0)],
	),
} if {
	_valid_input
	is_number(_threshold)
	object.get(_org, "monthly_active_users", 0) > _threshold
}

violations contains {
	"code": "license_use_restrictions",
	"msg": sprintf("%v carries use restrictions this organisation does not accept", [_declared]),
} if {
	_valid_input
	object.get(_license, "use_restrictions", null) == true
	object.get(_org, "accept_use_restrictions", false) != true
}

# --- provenance ---------------------------------------------------------------------------

_allowed_publisher if _publisher in _array(object.get(_org, "publishers", null))

violations contains {
	"code": "publisher_not_allowed",
	"msg": sprintf("publisher %v is not on the allowlist", [_publisher]),
} if {
	_valid_input
	not _allowed_publisher
}

_base := object.get(_v, "base_model", null)

_has_base if {
	is_string(_base)
	_base != ""
}

violations contains {
	"code": "base_model_missing",
	"msg": sprintf("a %v must declare the model it derives from", [_derivation]),
} if {
	_valid_input
	_derivation in _derived
	not _has_base
}

_base_known if object.get(_lineage, "base_model_approved", false) == true

_base_state := object.get(_lineage, "base_version_state", null)

_linked_base if is_string(_base_state)

# A linked base is registered: whether it is approved is the next rule's to say.
_base_known if _linked_base

violations contains {
	"code": "base_version_not_approved",
	"msg": sprintf("the version this derives from is %v; a derived version is approved only while its base is", [_base_state]),
} if {
	_valid_input
	_linked_base
	_base_state != "approved"
}

_base_known if _base in _array(object.get(_org, "known_base_models", null))

violations contains {
	"code": "base_model_unknown",
	"msg": sprintf("base model %v is neither approved here nor a known foundation model", [_base]),
} if {
	_valid_input
	_has_base
	not _base_known
}

# --- residency ----------------------------------------------------------------------------

_sovereign(region) if object.get(object.get(_zones, region, {}), "sovereign", false) == true

_has_storage_region if is_string(_storage_region)

violations contains {
	"code": "storage_region_missing",
	"msg": "no storage region is declared for the weights",
} if {
	_valid_input
	not _has_storage_region
}

violations contains {
	"code": "storage_region_not_sovereign",
	"msg": sprintf("storage region %v is outside the sovereign zones", [_storage_region]),
} if {
	_valid_input
	_has_storage_region
	not _sovereign(_storage_region)
}

# --- evaluation evidence ------------------------------------------------------------------
# data.charter.evidence.requirements: each {"id", "risk_tiers", "data_classes", "task",
# "metric", "filter", "min_ppm" or "max_ppm", "max_age_days"}, checked by Charter when the
# bundle loads. One applies to a version of a listed risk tier, or (at approval, when the
# input has `data_classes`) to an approval that would allow a listed data class. A result
# is fresh when it was made (else attached) within max_age_days of `now`.

_evidence := data.charter.evidence if is_object(data.charter.evidence)
else := {}

_requirements := [r |
	some r in _array(object.get(_evidence, "requirements", null))
	is_object(r)
]

_has_number(o, key) if is_number(object.get(o, key, null))

_applies(r) if object.get(_v, "risk_tier", null) in _array(object.get(r, "risk_tiers", null))

_applies(r) if {
	some c in _array(object.get(_input, "data_classes", null))
	c in _array(object.get(r, "data_classes", null))
}

_result_for(r, e) if {
	object.get(e, "task", null) == object.get(r, "task", null)
	object.get(e, "metric", null) == object.get(r, "metric", null)
	object.get(e, "filter", null) == object.get(r, "filter", "none")
}

_results(r) := [e | some e in _evaluations; _result_for(r, e)]

_made_at(e) := object.get(e, "evaluated_at", null) if _has_number(e, "evaluated_at")
else := object.get(e, "attached_at", 0)

_fresh(r, e) if not _has_number(r, "max_age_days")

_fresh(r, e) if {
	_has_number(r, "max_age_days")
	is_number(_now)
	_made_at(e) >= _now - object.get(r, "max_age_days", 0) * 86400
}

_fresh_values(r) := [object.get(e, "value_ppm", 0) | some e in _array(_results(r)); _fresh(r, e)]

_passes(r, value) if {
	_has_number(r, "min_ppm")
	value >= object.get(r, "min_ppm", 0)
}

_passes(r, value) if {
	not _has_number(r, "min_ppm")
	_has_number(r, "max_ppm")
	value <= object.get(r, "max_ppm", 0)
}

_met(r) if {
	some value in _array(_fresh_values(r))
	_passes(r, value)
}

# The best fresh value: the highest under a minimum, the lowest under a maximum.
_best(r) := v if {
	_has_number(r, "min_ppm")
	some v in _array(_fresh_values(r))
	every w in _array(_fresh_values(r)) {
		w <= v
	}
}

_best(r) := v if {
	not _has_number(r, "min_ppm")
	some v in _array(_fresh_values(r))
	every w in _array(_fresh_values(r)) {
		w >= v
	}
}

_bound(r) := sprintf("at least %v", [object.get(r, "min_ppm", 0)]) if _has_number(r, "min_ppm")
else := sprintf("at most %v", [object.get(r, "max_ppm", 0)])

_what(r) := sprintf("%v %v (filter %v)", [
	object.get(r, "task", ""), object.get(r, "metric", ""),
	object.get(r, "filter", "none"),
])

violations contains {
	"code": "evaluation_missing",
	"msg": sprintf("no result of %v is attached; requirement %v asks for one", [
		_what(r), object.get(r, "id", ""),
	]),
} if {
	_valid_input
	some r in _requirements
	_applies(r)
	count(_results(r)) == 0
}

violations contains {
	"code": "evaluation_stale",
	"msg": sprintf("every result of %v is older than %v days (requirement %v)", [
		_what(r), object.get(r, "max_age_days", 0), object.get(r, "id", ""),
	]),
} if {
	_valid_input
	some r in _requirements
	_applies(r)
	count(_results(r)) > 0
	count(_fresh_values(r)) == 0
}

_bounded(r) if _has_number(r, "min_ppm")

_bounded(r) if _has_number(r, "max_ppm")

violations contains {
	"code": "evaluation_below_threshold",
	"msg": sprintf("%v is %v ppm at best; requirement %v needs %v ppm", [
		_what(r), _best(r) + 0, object.get(r, "id", ""), _bound(r), # + 0: no "-0"
	]),
} if {
	_valid_input
	some r in _requirements
	_applies(r)
	_bounded(r)
	count(_fresh_values(r)) > 0
	not _met(r)
}

# --- warnings: gaps that do not block -----------------------------------------------------

warnings contains {
	"code": "datasets_missing",
	"msg": "no training datasets are declared",
} if {
	_valid_input
	count(_array(object.get(_v, "datasets", null))) == 0
}

warnings contains {"code": "license_card_missing", "msg": "the model card states no license"} if {
	_valid_input
	not _has_card
}

warnings contains {
	"code": "derivation_unknown",
	"msg": "whether this is an original model or derived from another is not declared",
} if {
	_valid_input
	_derivation in {null, "unknown"}
}

warnings contains {
	"code": "hosting_region_not_sovereign",
	"msg": sprintf("hosting region %v is outside the sovereign zones", [r]),
} if {
	_valid_input
	some r in _hosting_regions
	not _sovereign(r)
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
