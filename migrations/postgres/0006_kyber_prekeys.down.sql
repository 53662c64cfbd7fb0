-- Reverses 0006: every Kyber prekey goes, and with it the ids cleanup retired.
DELETE FROM keyserver_retired_prekeys WHERE key_kind = 'kyber';
ALTER TABLE keyserver_retired_prekeys DROP CONSTRAINT IF EXISTS keyserver_retired_prekeys_key_kind_check;
ALTER TABLE keyserver_retired_prekeys ADD CONSTRAINT keyserver_retired_prekeys_key_kind_check
    CHECK (key_kind IN ('one_time', 'signed'));
DROP TABLE IF EXISTS nchat_kyber_prekeys;
