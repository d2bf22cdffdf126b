"""Metering: requests and tokens per team, serving name and UTC day; quotas against them."""
