# The IAM evaluator's own tests (world/iam_policy.py), each against the IAM
# documentation's rules; run by crates/local-world/tests/world.rs with the
# world's Python (python -m unittest).

import json
import os
import tempfile
import unittest

import iam_policy as iam

ACCOUNT, REGION = "123456789012", "us-east-1"
OURS = {"ManagedBy": "ami-fleet"}


def policy(*statements):
    return {"Version": "2012-10-17", "Statement": list(statements)}


def allow(action, resource="*", condition=None, effect="Allow"):
    st = {"Effect": effect, "Action": action, "Resource": resource}
    if condition:
        st["Condition"] = condition
    return st


ONLY_OURS = {"StringEquals": {"aws:ResourceTag/ManagedBy": "ami-fleet"}}
TAGGED_CREATE = {"StringEquals": {"aws:RequestTag/ManagedBy": "ami-fleet"}}


def refusal(p, action, params, tags=None):
    tags = tags or {}
    return iam.refusal(p, action, params, ACCOUNT, REGION, lambda r: tags.get(r, {}))


class Decisions(unittest.TestCase):
    def test_nothing_allows_means_refused(self):
        self.assertIsNotNone(refusal(policy(), "DescribeImages", {}))

    def test_an_allow_of_the_action_allows(self):
        self.assertIsNone(refusal(policy(allow("ec2:Describe*")), "DescribeImages", {}))
        self.assertIsNotNone(refusal(policy(allow("ec2:Describe*")), "DeleteVolume", {"VolumeId": ["vol-1"]}))

    def test_an_explicit_deny_wins_over_an_allow(self):
        p = policy(allow("ec2:*"), allow("ec2:DeleteVolume", effect="Deny"))
        message = refusal(p, "DeleteVolume", {"VolumeId": ["vol-1"]})
        self.assertIn("explicit deny", message)
        self.assertIsNone(refusal(p, "DeleteSnapshot", {"SnapshotId": ["snap-1"]}))

    def test_the_resource_arn_must_match(self):
        p = policy(allow("ec2:DeleteSnapshot", "arn:aws:ec2:*::snapshot/*"))
        self.assertIsNone(refusal(p, "DeleteSnapshot", {"SnapshotId": ["snap-1"]}))
        p = policy(allow("ec2:DeleteSnapshot", "arn:aws:ec2:*:*:volume/*"))
        message = refusal(p, "DeleteSnapshot", {"SnapshotId": ["snap-1"]})
        self.assertIn("ec2:DeleteSnapshot on resource: arn:aws:ec2:us-east-1::snapshot/snap-1", message)


class Tags(unittest.TestCase):
    p = policy(allow("ec2:DeleteSnapshot", "arn:aws:ec2:*::snapshot/*", ONLY_OURS))

    def test_a_resource_with_the_tag_is_allowed(self):
        self.assertIsNone(refusal(self.p, "DeleteSnapshot", {"SnapshotId": ["snap-1"]}, {"snap-1": OURS}))

    def test_a_resource_without_the_tag_is_refused(self):
        self.assertIsNotNone(refusal(self.p, "DeleteSnapshot", {"SnapshotId": ["snap-1"]}, {"snap-1": {}}))

    def test_a_wrong_tag_value_is_refused(self):
        tags = {"snap-1": {"ManagedBy": "someone-else"}}
        self.assertIsNotNone(refusal(self.p, "DeleteSnapshot", {"SnapshotId": ["snap-1"]}, tags))

    def test_values_are_case_sensitive_and_keys_are_not(self):
        tags = {"snap-1": {"ManagedBy": "AMI-FLEET"}}
        self.assertIsNotNone(refusal(self.p, "DeleteSnapshot", {"SnapshotId": ["snap-1"]}, tags))
        p = policy(allow("ec2:DeleteSnapshot", "*", {"StringEquals": {"aws:resourcetag/managedby": "ami-fleet"}}))
        self.assertIsNone(refusal(p, "DeleteSnapshot", {"SnapshotId": ["snap-1"]}, {"snap-1": OURS}))

    def test_a_resource_that_does_not_exist_is_left_to_its_not_found(self):
        gone = lambda r: None  # noqa: E731
        r = iam.refusal(self.p, "DeleteSnapshot", {"SnapshotId": ["snap-1"]}, ACCOUNT, REGION, gone)
        self.assertIsNone(r)

    def test_every_resource_of_a_call_must_be_allowed(self):
        p = policy(allow(["ec2:CreateTags"], "*", ONLY_OURS))
        params = {"ResourceId.1": ["snap-1"], "ResourceId.2": ["ami-2"], "Tag.1.Key": ["K"], "Tag.1.Value": ["v"]}
        self.assertIsNone(refusal(p, "CreateTags", params, {"snap-1": OURS, "ami-2": OURS}))
        message = refusal(p, "CreateTags", params, {"snap-1": OURS})
        self.assertIn("image/ami-2", message)

    def test_a_create_needs_its_request_tags_and_tagging_on_create(self):
        create = policy(allow("ec2:CreateVolume", "arn:aws:ec2:*:*:volume/*", TAGGED_CREATE))
        on_create = allow("ec2:CreateTags", "*", {"StringEquals": {"ec2:CreateAction": "CreateVolume"}})
        params = {
            "AvailabilityZone": ["us-east-1a"],
            "TagSpecification.1.ResourceType": ["volume"],
            "TagSpecification.1.Tag.1.Key": ["ManagedBy"],
            "TagSpecification.1.Tag.1.Value": ["ami-fleet"],
        }
        self.assertIn("ec2:CreateTags", refusal(create, "CreateVolume", params))
        create["Statement"].append(on_create)
        self.assertIsNone(refusal(create, "CreateVolume", params))
        untagged = {"AvailabilityZone": ["us-east-1a"]}
        self.assertIn("ec2:CreateVolume", refusal(create, "CreateVolume", untagged))

    def test_create_snapshot_is_authorized_on_the_source_volume_too(self):
        p = policy(
            allow("ec2:CreateSnapshot", "arn:aws:ec2:*::snapshot/*", TAGGED_CREATE),
            allow("ec2:CreateSnapshot", "arn:aws:ec2:*:*:volume/*", ONLY_OURS),
            allow("ec2:CreateTags", "*", {"StringEquals": {"ec2:CreateAction": "CreateSnapshot"}}),
        )
        params = {
            "VolumeId": ["vol-1"],
            "TagSpecification.1.ResourceType": ["snapshot"],
            "TagSpecification.1.Tag.1.Key": ["ManagedBy"],
            "TagSpecification.1.Tag.1.Value": ["ami-fleet"],
        }
        self.assertIsNone(refusal(p, "CreateSnapshot", params, {"vol-1": OURS}))
        self.assertIn("volume/vol-1", refusal(p, "CreateSnapshot", params, {"vol-1": {}}))


class Operators(unittest.TestCase):
    def holds(self, op, key, patterns, context):
        return iam.condition_holds(op, key, patterns, context)

    def test_string_like_wildcards(self):
        self.assertTrue(self.holds("StringLike", "k", "ami-*", {"k": "ami-fleet"}))
        self.assertTrue(self.holds("StringLike", "k", "ami-?leet", {"k": "ami-fleet"}))
        self.assertFalse(self.holds("StringLike", "k", "ami-?", {"k": "ami-fleet"}))
        self.assertFalse(self.holds("StringEquals", "k", "ami-*", {"k": "ami-fleet"}))

    def test_values_of_one_operator_are_ored(self):
        self.assertTrue(self.holds("StringEquals", "k", ["a", "b"], {"k": "b"}))

    def test_a_missing_key(self):
        self.assertFalse(self.holds("StringEquals", "k", "a", {}))
        self.assertTrue(self.holds("StringNotEquals", "k", "a", {}))
        self.assertTrue(self.holds("StringEqualsIfExists", "k", "a", {}))
        self.assertTrue(self.holds("Null", "k", "true", {}))
        self.assertFalse(self.holds("Null", "k", "false", {}))
        self.assertTrue(self.holds("Null", "k", "false", {"k": "x"}))

    def test_set_operators(self):
        keys = {"aws:tagkeys": ["ImageStream", "ImageLeaf"]}
        allowed = ["ImageStream", "ImageLeaf", "ImageDigest"]
        self.assertTrue(self.holds("ForAllValues:StringEquals", "aws:TagKeys", allowed, keys))
        self.assertFalse(self.holds("ForAllValues:StringEquals", "aws:TagKeys", ["ImageStream"], keys))
        self.assertTrue(self.holds("ForAnyValue:StringEquals", "aws:TagKeys", ["ImageLeaf"], keys))
        self.assertFalse(self.holds("ForAnyValue:StringEquals", "aws:TagKeys", ["Name"], keys))
        # ForAllValues of an absent key holds (nothing to test).
        self.assertTrue(self.holds("ForAllValues:StringEquals", "aws:TagKeys", ["Name"], {}))

    def test_operators_are_anded(self):
        p = policy(
            allow(
                "ec2:CreateTags",
                "*",
                {
                    "StringEquals": {"aws:ResourceTag/ManagedBy": "ami-fleet"},
                    "ForAllValues:StringEquals": {"aws:TagKeys": ["Latest"]},
                },
            )
        )
        ok = {"ResourceId.1": ["ami-1"], "Tag.1.Key": ["Latest"], "Tag.1.Value": ["yes"]}
        self.assertIsNone(refusal(p, "CreateTags", ok, {"ami-1": OURS}))
        other_key = {"ResourceId.1": ["ami-1"], "Tag.1.Key": ["ManagedBy"], "Tag.1.Value": ["x"]}
        self.assertIsNotNone(refusal(p, "CreateTags", other_key, {"ami-1": OURS}))


class Loading(unittest.TestCase):
    def load(self, p):
        with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
            json.dump(p, f)
        try:
            return iam.load(f.name)
        finally:
            os.unlink(f.name)

    def test_what_is_not_modelled_is_refused_at_load(self):
        with self.assertRaises(iam.PolicyError):
            self.load(policy(allow("ec2:X", "*", {"DateLessThan": {"aws:CurrentTime": "2030-01-01"}})))
        with self.assertRaises(iam.PolicyError):
            self.load(policy(allow("ec2:X", "*", {"StringEquals": {"aws:SourceIp": "1.2.3.4"}})))
        with self.assertRaises(iam.PolicyError):
            self.load(policy({"Effect": "Allow", "NotAction": "ec2:X", "Resource": "*"}))

    def test_the_shipped_policy_loads(self):
        shipped = os.environ.get("SHIPPED_POLICY")
        if shipped:
            iam.load(shipped)


if __name__ == "__main__":
    unittest.main()
