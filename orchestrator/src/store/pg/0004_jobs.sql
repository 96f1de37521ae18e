-- Aloft store, schema 4: each member's own part of its job (`MemberJob`: the content key wrapped
-- for that device, the job's issue time, the root version its chain ends at). A job's wrapped
-- key is HPKE with a fresh ephemeral key, so wrapping again gives other bytes: the engine makes
-- it once, commits it here in the transaction that makes the member notified (or in the first
-- commit after, for a member notified before this schema), and republishes the job from it,
-- byte for byte. The campaign's manifest is not copied here: jobs are rebuilt from the campaign.
-- A row is written once and replaced only if the device's key changed; members notified before
-- this schema have none until the engine makes theirs.
CREATE TABLE aloft_jobs (
    campaign text COLLATE "C" NOT NULL,
    device text COLLATE "C" NOT NULL,
    v bytea NOT NULL,
    PRIMARY KEY (campaign, device)
);
