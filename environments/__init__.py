"""Concrete environments shipped with agentrl; each subpackage registers through entry points."""
