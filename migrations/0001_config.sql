-- The config lives in one table per entity kind: the entity as JSONB (the
-- same document the files and the admin API use) beside typed columns for
-- what is searched and compared. Every write bumps config_state.version in
-- the same transaction and is recorded in audit_log.

-- `instance` names this database: a database rebuilt from scratch (disaster
-- recovery) starts its versions again, and nodes must not take its version
-- 1 for older than the version 57 they saved from the previous one.
CREATE TABLE config_state (
    id         SMALLINT    PRIMARY KEY DEFAULT 1 CHECK (id = 1),
    instance   UUID        NOT NULL DEFAULT gen_random_uuid(),
    version    BIGINT      NOT NULL,
    updated_at TIMESTAMPTZ NOT NULL DEFAULT now()
);
INSERT INTO config_state (id, version) VALUES (1, 1);

CREATE TABLE routes (
    name       TEXT        PRIMARY KEY,
    tags       TEXT[]      NOT NULL DEFAULT '{}',
    version    BIGINT      NOT NULL DEFAULT 1,
    entity     JSONB       NOT NULL,
    created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE TABLE compositions (LIKE routes INCLUDING ALL);
CREATE TABLE consumers (LIKE routes INCLUDING ALL);
CREATE TABLE policies (LIKE routes INCLUDING ALL);
CREATE INDEX routes_tags ON routes USING GIN (tags);
CREATE INDEX compositions_tags ON compositions USING GIN (tags);
CREATE INDEX consumers_tags ON consumers USING GIN (tags);
CREATE INDEX policies_tags ON policies USING GIN (tags);

CREATE TABLE audit_log (
    id             BIGSERIAL   PRIMARY KEY,
    at             TIMESTAMPTZ NOT NULL DEFAULT now(),
    actor          TEXT        NOT NULL,
    action         TEXT        NOT NULL,
    kind           TEXT        NOT NULL,
    name           TEXT        NOT NULL,
    before         JSONB,
    after          JSONB,
    config_version BIGINT      NOT NULL
);
CREATE INDEX audit_log_at ON audit_log (at);
