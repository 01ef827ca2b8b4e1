-- Certificates the TLS listener serves are a sixth entity kind, stored like
-- the others (LIKE routes INCLUDING ALL: primary key, GIN index on tags).
-- The entity holds its private key: the table is as sensitive as the
-- database's credentials. The audit log keeps the key's SHA-256 only.
CREATE TABLE certificates (LIKE routes INCLUDING ALL);
