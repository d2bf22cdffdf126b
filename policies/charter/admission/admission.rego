# May this model version be approved?
#
# Input: {"version": {...registry fields...}, "lineage": {"base_model_approved": bool}}
# Data:  data.charter.licenses, data.charter.residency, data.charter.organisation
# Output: decision := {"allow", "violations": [{"code", "msg"}], "warnings": [{"code", "msg"}]}
package charter.admission

import rego.v1

_org := data.charter.organisation

_licenses := data.charter.licenses

_zones := data.charter.residency.zones

_v := input.version

_derived := {"fine_tune", "adapter", "quantized", "merge"}

# --- input shape: anything malformed denies -------------------------------------------

_valid_input if {
	is_object(_v)
	is_string(_v.publisher)
	is_array(_v.files)
	is_array(_v.datasets)
	is_boolean(_v.unsafe_weights)
}

violations contains {"code": "input_invalid", "msg": "the admission input is malformed"} if {
	not _valid_input
}

# --- pinning and integrity --------------------------------------------------------------

_pinned if {
	is_string(_v.source_revision)
	regex.match(`^([0-9a-f]{40}|[0-9a-f]{64})$`, _v.source_revision)
}

violations contains {
	"code": "revision_not_pinned",
	"msg": sprintf("source revision %v is not a commit hash (a branch or tag can move)", [_rev]),
} if {
	_valid_input
	not _pinned
	_rev := object.get(_v, "source_revision", null)
}

_weight_files := [f | some f in _v.files; f.kind == "weights"]

violations contains {
	"code": "no_weight_files",
	"msg": "no weight files are listed, so nothing pins what would be served",
} if {
	_valid_input
	count(_weight_files) == 0
}

violations contains {
	"code": "file_digest_missing",
	"msg": sprintf("%v has no SHA-256 digest", [f.path]),
} if {
	_valid_input
	some f in _v.files
	not _has_digest(f)
}

_has_digest(f) if {
	is_string(f.sha256)
	regex.match(`^[0-9a-f]{64}$`, f.sha256)
}

violations contains {
	"code": "pickle_weights",
	"msg": "pickle-based weight files execute code when loaded; convert them to safetensors",
} if {
	_valid_input
	_v.unsafe_weights == true
}

# --- license ------------------------------------------------------------------------------

_declared := lower(_v.license_declared) if is_string(_v.license_declared)

_card := lower(_v.license_card) if is_string(_v.license_card)

_license := _licenses[_declared]

violations contains {"code": "license_missing", "msg": "the submitter declared no license"} if {
	_valid_input
	not _declared
}

violations contains {
	"code": "license_unknown",
	"msg": sprintf("license %v is not in the license catalog", [_declared]),
} if {
	_valid_input
	_declared
	not _licenses[_declared]
}

violations contains {
	"code": "license_mismatch",
	"msg": sprintf("declared license %v differs from the model card's %v", [_declared, _card]),
} if {
	_valid_input
	_declared
	_card
	_declared != _card
}

violations contains {
	"code": "license_not_commercial",
	"msg": sprintf("%v does not allow commercial use, which this organisation needs", [_declared]),
} if {
	_valid_input
	_org.commercial_use_required == true
	_license.commercial_use == false
}

violations contains {
	"code": "license_user_threshold",
	"msg": sprintf(
		"%v needs a separate license above %v monthly users; the organisation has %v",
		[_declared, _license.user_threshold, _org.monthly_active_users],
	),
} if {
	_valid_input
	is_number(_license.user_threshold)
	_org.monthly_active_users > _license.user_threshold
}

violations contains {
	"code": "license_use_restrictions",
	"msg": sprintf("%v carries use restrictions this organisation does not accept", [_declared]),
} if {
	_valid_input
	_license.use_restrictions == true
	_org.accept_use_restrictions != true
}

# --- provenance ---------------------------------------------------------------------------

violations contains {
	"code": "publisher_not_allowed",
	"msg": sprintf("publisher %v is not on the allowlist", [_v.publisher]),
} if {
	_valid_input
	allowed := object.get(_org, "publishers", [])
	not _v.publisher in allowed
}

_base := _v.base_model if {
	is_string(_v.base_model)
	_v.base_model != ""
}

violations contains {
	"code": "base_model_missing",
	"msg": sprintf("a %v must declare the model it derives from", [_v.derivation]),
} if {
	_valid_input
	_v.derivation in _derived
	not _base
}

_base_known if object.get(object.get(input, "lineage", {}), "base_model_approved", false) == true

_base_known if _base in object.get(_org, "known_base_models", [])

violations contains {
	"code": "base_model_unknown",
	"msg": sprintf("base model %v is neither approved here nor a known foundation model", [_base]),
} if {
	_valid_input
	_base
	not _base_known
}

# --- residency ----------------------------------------------------------------------------

_sovereign(region) if _zones[region].sovereign == true

violations contains {
	"code": "storage_region_missing",
	"msg": "no storage region is declared for the weights",
} if {
	_valid_input

	# Not `not is_string(_v.storage_region)`: with the key absent, the reference is
	# undefined under `not`, which OPA and regorus decide differently. object.get is
	# always defined.
	not is_string(object.get(_v, "storage_region", null))
}

violations contains {
	"code": "storage_region_not_sovereign",
	"msg": sprintf("storage region %v is outside the sovereign zones", [_v.storage_region]),
} if {
	_valid_input
	is_string(_v.storage_region)
	not _sovereign(_v.storage_region)
}

# --- warnings: gaps that do not block -----------------------------------------------------

warnings contains {
	"code": "datasets_missing",
	"msg": "no training datasets are declared",
} if {
	_valid_input
	count(_v.datasets) == 0
}

warnings contains {"code": "license_card_missing", "msg": "the model card states no license"} if {
	_valid_input
	not _card
}

warnings contains {
	"code": "derivation_unknown",
	"msg": "whether this is an original model or derived from another is not declared",
} if {
	_valid_input
	object.get(_v, "derivation", "unknown") == "unknown"
}

warnings contains {
	"code": "hosting_region_not_sovereign",
	"msg": sprintf("hosting region %v is outside the sovereign zones", [r]),
} if {
	_valid_input
	some r in object.get(_v, "hosting_regions", [])
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
