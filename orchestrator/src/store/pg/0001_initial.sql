-- Aloft store, schema 1: one table per sled tree, key parts as explicit columns. Text keys are
-- in the "C" collation so rows sort as sled's byte keys do; values are the bytes sled holds
-- (JSON records, sealed chunks, the sealed key check).
CREATE TABLE aloft_meta (
    name text COLLATE "C" PRIMARY KEY,
    v bytea NOT NULL
);
CREATE TABLE aloft_devices (
    id text COLLATE "C" PRIMARY KEY,
    v bytea NOT NULL
);
CREATE TABLE aloft_releases (
    artifact text COLLATE "C" PRIMARY KEY,
    v bytea NOT NULL
);
CREATE TABLE aloft_chunks (
    artifact text COLLATE "C" NOT NULL,
    idx bigint NOT NULL,
    v bytea NOT NULL,
    PRIMARY KEY (artifact, idx)
);
-- Sealed chunks do not compress: store them out of line without trying.
ALTER TABLE aloft_chunks ALTER COLUMN v SET STORAGE EXTERNAL;
CREATE TABLE aloft_campaigns (
    id text COLLATE "C" PRIMARY KEY,
    v bytea NOT NULL
);
-- One row per (campaign, device): the row a conditional write on the device's sequence will
-- guard (issue 12, replicas).
CREATE TABLE aloft_progress (
    campaign text COLLATE "C" NOT NULL,
    device text COLLATE "C" NOT NULL,
    v bytea NOT NULL,
    PRIMARY KEY (campaign, device)
);
CREATE TABLE aloft_history (
    device text COLLATE "C" NOT NULL,
    n bigint NOT NULL,
    v bytea NOT NULL,
    PRIMARY KEY (device, n)
);
CREATE TABLE aloft_audit (
    seq bigint PRIMARY KEY,
    v bytea NOT NULL
);
