-- Entities are stored as JSON, not JSONB: JSONB sorts an object's keys, and
-- the key order of a composition's `response.body` is the order of the JSON
-- the gateway serves. JSON keeps the text as written. Nothing queries inside
-- an entity (tags have their own column), so nothing is lost. Rows written
-- before this migration keep the order JSONB gave them.
ALTER TABLE routes ALTER COLUMN entity TYPE JSON USING entity::json;
ALTER TABLE compositions ALTER COLUMN entity TYPE JSON USING entity::json;
ALTER TABLE consumers ALTER COLUMN entity TYPE JSON USING entity::json;
ALTER TABLE policies ALTER COLUMN entity TYPE JSON USING entity::json;
ALTER TABLE audit_log ALTER COLUMN before TYPE JSON USING before::json;
ALTER TABLE audit_log ALTER COLUMN after TYPE JSON USING after::json;
