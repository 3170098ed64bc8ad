-- iafactory:no-transaction
-- 007: tenant_id on every table, and the tables of the multi-tenant product.
--
-- Runs statement by statement, outside a transaction (the marker above tells the runner; psql
-- runs it the same way without -1): on a large live table it must not hold writers off.
--   * ADD COLUMN ... DEFAULT <constant> is metadata-only (PostgreSQL 11+): no rewrite, and every
--     existing row reads back as the system-default tenant without an UPDATE.
--   * The foreign key is added NOT VALID, then validated under SHARE UPDATE EXCLUSIVE (writers go on).
--   * NOT NULL goes through a validated CHECK, so SET NOT NULL skips its full-table scan.
--   * Each brief ACCESS EXCLUSIVE step uses a 100 ms lock_timeout and retries, so a long reader
--     never makes writers queue behind the DDL.
--   * Indexes on the existing tables are built CONCURRENTLY.
-- Every statement is idempotent: a run that stopped half-way is finished by running it again.
--
-- The old tables keep DEFAULT system-default on tenant_id, so a single-tenant application that
-- is still running during the upgrade keeps working; migration 008 removes it.
--
-- Keys: new tables have a primary key that starts with tenant_id, and every reference between
-- tenant tables includes tenant_id, so no row can point at another tenant's row, and the schema
-- can be distributed by tenant_id (Citus). Foreign keys to tenants are ON DELETE RESTRICT: a
-- tenant's data is erased explicitly (iafactory tenants erase), never by accident.
-- The single-column idx_{table}_tenant of the original plan is left out: the composite
-- idx_{table}_tenant_created leads with tenant_id and serves every query the other would.

-- Runs one DDL statement with a short lock_timeout, retrying while the lock is busy.
CREATE OR REPLACE PROCEDURE app.run_ddl_briefly(ddl text, max_attempts integer DEFAULT 200)
    LANGUAGE plpgsql AS $$
DECLARE
    attempt integer := 0;
BEGIN
    LOOP
        attempt := attempt + 1;
        BEGIN
            PERFORM set_config('lock_timeout', '100ms', true);
            EXECUTE ddl;
            RETURN;
        EXCEPTION WHEN lock_not_available THEN
            IF attempt >= max_attempts THEN
                RAISE;
            END IF;
            PERFORM pg_sleep(least(0.01 * attempt, 0.25));
        END;
    END LOOP;
END
$$;

-- tenant_id on an existing table, with a committed step after each lock.
CREATE OR REPLACE PROCEDURE app.attach_table_to_tenants(tbl text)
    LANGUAGE plpgsql AS $$
DECLARE
    fk_name text := tbl || '_tenant_id_fkey';
    check_name text := tbl || '_tenant_id_not_null';
BEGIN
    CALL app.run_ddl_briefly(format(
        'ALTER TABLE %I ADD COLUMN IF NOT EXISTS tenant_id uuid DEFAULT %L',
        tbl, '00000000-0000-0000-0000-000000000000'));
    COMMIT;

    IF NOT EXISTS (SELECT 1 FROM pg_constraint WHERE conrelid = tbl::regclass AND conname = fk_name) THEN
        CALL app.run_ddl_briefly(format(
            'ALTER TABLE %I ADD CONSTRAINT %I FOREIGN KEY (tenant_id) REFERENCES tenants (id) ON DELETE RESTRICT NOT VALID',
            tbl, fk_name));
    END IF;
    COMMIT;
    EXECUTE format('ALTER TABLE %I VALIDATE CONSTRAINT %I', tbl, fk_name);
    COMMIT;

    IF NOT (SELECT attnotnull FROM pg_attribute WHERE attrelid = tbl::regclass AND attname = 'tenant_id') THEN
        IF NOT EXISTS (SELECT 1 FROM pg_constraint WHERE conrelid = tbl::regclass AND conname = check_name) THEN
            CALL app.run_ddl_briefly(format(
                'ALTER TABLE %I ADD CONSTRAINT %I CHECK (tenant_id IS NOT NULL) NOT VALID', tbl, check_name));
        END IF;
        COMMIT;
        EXECUTE format('ALTER TABLE %I VALIDATE CONSTRAINT %I', tbl, check_name);
        COMMIT;
        CALL app.run_ddl_briefly(format('ALTER TABLE %I ALTER COLUMN tenant_id SET NOT NULL', tbl));
        COMMIT;
    END IF;
    IF EXISTS (SELECT 1 FROM pg_constraint WHERE conrelid = tbl::regclass AND conname = check_name) THEN
        CALL app.run_ddl_briefly(format('ALTER TABLE %I DROP CONSTRAINT %I', tbl, check_name));
    END IF;
    COMMIT;
END
$$;

-- Replaces a workflow's single-column reference to projects by one that includes tenant_id.
CREATE OR REPLACE PROCEDURE app.scope_project_reference(tbl text)
    LANGUAGE plpgsql AS $$
DECLARE
    new_fk text := tbl || '_tenant_project_fkey';
    old_fk text := tbl || '_project_id_fkey';
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_constraint WHERE conrelid = tbl::regclass AND conname = new_fk) THEN
        CALL app.run_ddl_briefly(format(
            'ALTER TABLE %I ADD CONSTRAINT %I FOREIGN KEY (tenant_id, project_id) '
            'REFERENCES projects (tenant_id, id) ON DELETE CASCADE NOT VALID', tbl, new_fk));
    END IF;
    COMMIT;
    EXECUTE format('ALTER TABLE %I VALIDATE CONSTRAINT %I', tbl, new_fk);
    COMMIT;
    IF EXISTS (SELECT 1 FROM pg_constraint WHERE conrelid = tbl::regclass AND conname = old_fk) THEN
        CALL app.run_ddl_briefly(format('ALTER TABLE %I DROP CONSTRAINT %I', tbl, old_fk));
    END IF;
    COMMIT;
END
$$;

-- The five tables that existed before tenancy.
CALL app.attach_table_to_tenants('projects');
CALL app.attach_table_to_tenants('knowledge_base');
CALL app.attach_table_to_tenants('bolt_workflows');
CALL app.attach_table_to_tenants('bmad_workflows');
CALL app.attach_table_to_tenants('orchestrator_state');

-- (tenant_id, id) is unique so that composite references to these tables work.
CREATE UNIQUE INDEX CONCURRENTLY IF NOT EXISTS projects_tenant_id_id_key ON projects (tenant_id, id);
CREATE UNIQUE INDEX CONCURRENTLY IF NOT EXISTS knowledge_base_tenant_id_id_key ON knowledge_base (tenant_id, id);
CREATE UNIQUE INDEX CONCURRENTLY IF NOT EXISTS bolt_workflows_tenant_id_id_key ON bolt_workflows (tenant_id, id);
CREATE UNIQUE INDEX CONCURRENTLY IF NOT EXISTS bmad_workflows_tenant_id_id_key ON bmad_workflows (tenant_id, id);
CREATE UNIQUE INDEX CONCURRENTLY IF NOT EXISTS orchestrator_state_tenant_id_id_key ON orchestrator_state (tenant_id, id);

CREATE INDEX CONCURRENTLY IF NOT EXISTS idx_projects_tenant_created ON projects (tenant_id, created_at DESC);
CREATE INDEX CONCURRENTLY IF NOT EXISTS idx_knowledge_base_tenant_created ON knowledge_base (tenant_id, created_at DESC);
CREATE INDEX CONCURRENTLY IF NOT EXISTS idx_bolt_workflows_tenant_created ON bolt_workflows (tenant_id, created_at DESC);
CREATE INDEX CONCURRENTLY IF NOT EXISTS idx_bmad_workflows_tenant_created ON bmad_workflows (tenant_id, created_at DESC);
CREATE INDEX CONCURRENTLY IF NOT EXISTS idx_orchestrator_state_tenant_created ON orchestrator_state (tenant_id, created_at DESC);

CALL app.scope_project_reference('bolt_workflows');
CALL app.scope_project_reference('bmad_workflows');
CREATE INDEX CONCURRENTLY IF NOT EXISTS idx_bolt_workflows_tenant_project ON bolt_workflows (tenant_id, project_id);
CREATE INDEX CONCURRENTLY IF NOT EXISTS idx_bmad_workflows_tenant_project ON bmad_workflows (tenant_id, project_id);

DROP PROCEDURE IF EXISTS app.attach_table_to_tenants(text);
DROP PROCEDURE IF EXISTS app.scope_project_reference(text);

-- New tables of the multi-tenant product. Empty when created, so plain CREATE INDEX is fine.

CREATE TABLE IF NOT EXISTS api_keys (
    tenant_id    uuid NOT NULL REFERENCES tenants (id) ON DELETE RESTRICT,
    id           uuid NOT NULL DEFAULT gen_random_uuid(),
    name         varchar(100) NOT NULL,
    -- The public start of the key (e.g. iaf_live_3kq9x2ab): how a key is found and recognised.
    prefix       varchar(32) NOT NULL,
    -- HMAC-SHA256 of the whole key with a server secret. The secret key itself is never stored.
    key_hash     bytea NOT NULL,
    scope        varchar(10) NOT NULL DEFAULT 'read',
    created_by   integer REFERENCES users (id) ON DELETE SET NULL,
    created_at   timestamptz NOT NULL DEFAULT now(),
    expires_at   timestamptz,
    last_used_at timestamptz,
    revoked_at   timestamptz,
    PRIMARY KEY (tenant_id, id),
    CONSTRAINT api_keys_prefix_key UNIQUE (tenant_id, prefix),
    CONSTRAINT api_keys_scope_valid CHECK (scope IN ('read', 'write')),
    CONSTRAINT api_keys_hash_length CHECK (octet_length(key_hash) = 32)
);
CREATE INDEX IF NOT EXISTS idx_api_keys_tenant_created ON api_keys (tenant_id, created_at DESC);

CREATE TABLE IF NOT EXISTS usage_events (
    tenant_id       uuid NOT NULL REFERENCES tenants (id) ON DELETE RESTRICT,
    id              uuid NOT NULL DEFAULT gen_random_uuid(),
    event_type      varchar(100) NOT NULL,
    quantity        numeric(20, 6) NOT NULL DEFAULT 1,
    occurred_at     timestamptz NOT NULL DEFAULT now(),
    -- Retried deliveries carry the same key and are counted once.
    idempotency_key varchar(255) NOT NULL,
    properties      jsonb NOT NULL DEFAULT '{}'::jsonb,
    user_id         integer,
    api_key_id      uuid,
    created_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, id),
    CONSTRAINT usage_events_idempotency_key UNIQUE (tenant_id, idempotency_key),
    CONSTRAINT usage_events_quantity_positive CHECK (quantity >= 0),
    CONSTRAINT usage_events_properties_object CHECK (jsonb_typeof(properties) = 'object')
);
CREATE INDEX IF NOT EXISTS idx_usage_events_tenant_created ON usage_events (tenant_id, created_at DESC);

CREATE TABLE IF NOT EXISTS voice_transcriptions (
    tenant_id        uuid NOT NULL REFERENCES tenants (id) ON DELETE RESTRICT,
    id               uuid NOT NULL DEFAULT gen_random_uuid(),
    title            varchar(255) NOT NULL DEFAULT '',
    audio_url        varchar(2000),
    language         varchar(8),
    duration_seconds numeric(10, 2),
    transcript       text NOT NULL DEFAULT '',
    status           varchar(20) NOT NULL DEFAULT 'pending',
    metadata         jsonb NOT NULL DEFAULT '{}'::jsonb,
    created_at       timestamptz NOT NULL DEFAULT now(),
    updated_at       timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, id),
    CONSTRAINT voice_transcriptions_status_valid CHECK (status IN ('pending', 'processing', 'completed', 'failed')),
    CONSTRAINT voice_transcriptions_duration_positive CHECK (duration_seconds IS NULL OR duration_seconds >= 0)
);
CREATE INDEX IF NOT EXISTS idx_voice_transcriptions_tenant_created ON voice_transcriptions (tenant_id, created_at DESC);
CREATE OR REPLACE TRIGGER voice_transcriptions_touch_updated_at
    BEFORE UPDATE ON voice_transcriptions
    FOR EACH ROW EXECUTE FUNCTION app.touch_updated_at();

CREATE TABLE IF NOT EXISTS voice_conversations (
    tenant_id  uuid NOT NULL REFERENCES tenants (id) ON DELETE RESTRICT,
    id         uuid NOT NULL DEFAULT gen_random_uuid(),
    agent_name varchar(100) NOT NULL,
    channel    varchar(20) NOT NULL DEFAULT 'web',
    caller     varchar(100),
    status     varchar(20) NOT NULL DEFAULT 'active',
    language   varchar(8),
    messages   jsonb NOT NULL DEFAULT '[]'::jsonb,
    summary    text,
    started_at timestamptz NOT NULL DEFAULT now(),
    ended_at   timestamptz,
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, id),
    CONSTRAINT voice_conversations_channel_valid CHECK (channel IN ('phone', 'web', 'whatsapp')),
    CONSTRAINT voice_conversations_status_valid CHECK (status IN ('active', 'ended', 'failed')),
    CONSTRAINT voice_conversations_messages_array CHECK (jsonb_typeof(messages) = 'array')
);
CREATE INDEX IF NOT EXISTS idx_voice_conversations_tenant_created ON voice_conversations (tenant_id, created_at DESC);
CREATE OR REPLACE TRIGGER voice_conversations_touch_updated_at
    BEFORE UPDATE ON voice_conversations
    FOR EACH ROW EXECUTE FUNCTION app.touch_updated_at();

CREATE TABLE IF NOT EXISTS crm_leads (
    tenant_id  uuid NOT NULL REFERENCES tenants (id) ON DELETE RESTRICT,
    id         uuid NOT NULL DEFAULT gen_random_uuid(),
    full_name  varchar(255) NOT NULL,
    email      varchar(255),
    phone      varchar(50),
    company    varchar(255),
    source     varchar(50) NOT NULL DEFAULT 'manual',
    status     varchar(20) NOT NULL DEFAULT 'new',
    score      smallint,
    notes      text NOT NULL DEFAULT '',
    metadata   jsonb NOT NULL DEFAULT '{}'::jsonb,
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, id),
    CONSTRAINT crm_leads_status_valid CHECK (status IN ('new', 'contacted', 'qualified', 'converted', 'lost')),
    CONSTRAINT crm_leads_score_range CHECK (score IS NULL OR score BETWEEN 0 AND 100)
);
CREATE INDEX IF NOT EXISTS idx_crm_leads_tenant_created ON crm_leads (tenant_id, created_at DESC);
CREATE OR REPLACE TRIGGER crm_leads_touch_updated_at
    BEFORE UPDATE ON crm_leads
    FOR EACH ROW EXECUTE FUNCTION app.touch_updated_at();

CREATE TABLE IF NOT EXISTS crm_deals (
    tenant_id           uuid NOT NULL REFERENCES tenants (id) ON DELETE RESTRICT,
    id                  uuid NOT NULL DEFAULT gen_random_uuid(),
    lead_id             uuid NOT NULL,
    title               varchar(255) NOT NULL,
    amount              numeric(14, 2) NOT NULL DEFAULT 0,
    currency            char(3) NOT NULL DEFAULT 'CHF',
    stage               varchar(20) NOT NULL DEFAULT 'prospecting',
    expected_close_date date,
    metadata            jsonb NOT NULL DEFAULT '{}'::jsonb,
    created_at          timestamptz NOT NULL DEFAULT now(),
    updated_at          timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, id),
    -- A deal can only reference a lead of its own tenant; a lead with deals cannot be deleted.
    CONSTRAINT crm_deals_lead_fkey FOREIGN KEY (tenant_id, lead_id)
        REFERENCES crm_leads (tenant_id, id) ON DELETE RESTRICT,
    CONSTRAINT crm_deals_amount_positive CHECK (amount >= 0),
    CONSTRAINT crm_deals_currency_valid CHECK (currency IN ('DZD', 'CHF', 'EUR', 'CAD')),
    CONSTRAINT crm_deals_stage_valid CHECK (stage IN ('prospecting', 'proposal', 'negotiation', 'won', 'lost'))
);
CREATE INDEX IF NOT EXISTS idx_crm_deals_tenant_created ON crm_deals (tenant_id, created_at DESC);
CREATE OR REPLACE TRIGGER crm_deals_touch_updated_at
    BEFORE UPDATE ON crm_deals
    FOR EACH ROW EXECUTE FUNCTION app.touch_updated_at();

CREATE TABLE IF NOT EXISTS billing_accounts (
    -- One billing account per tenant.
    tenant_id      uuid NOT NULL REFERENCES tenants (id) ON DELETE RESTRICT,
    billing_name   varchar(255) NOT NULL DEFAULT '',
    billing_email  varchar(255),
    address        text NOT NULL DEFAULT '',
    vat_number     varchar(50),
    currency       char(3) NOT NULL DEFAULT 'CHF',
    -- Credits, in whole units. Kept equal to the sum of credit_transactions; never negative.
    credit_balance bigint NOT NULL DEFAULT 0,
    created_at     timestamptz NOT NULL DEFAULT now(),
    updated_at     timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id),
    CONSTRAINT billing_accounts_balance_not_negative CHECK (credit_balance >= 0),
    CONSTRAINT billing_accounts_currency_valid CHECK (currency IN ('DZD', 'CHF', 'EUR', 'CAD'))
);
CREATE INDEX IF NOT EXISTS idx_billing_accounts_tenant_created ON billing_accounts (tenant_id, created_at DESC);
CREATE OR REPLACE TRIGGER billing_accounts_touch_updated_at
    BEFORE UPDATE ON billing_accounts
    FOR EACH ROW EXECUTE FUNCTION app.touch_updated_at();

CREATE TABLE IF NOT EXISTS credit_transactions (
    tenant_id       uuid NOT NULL,
    id              uuid NOT NULL DEFAULT gen_random_uuid(),
    kind            varchar(20) NOT NULL,
    -- Signed: grants and refunds add, debits subtract.
    amount          bigint NOT NULL,
    reason          varchar(500) NOT NULL,
    idempotency_key varchar(255) NOT NULL,
    balance_after   bigint NOT NULL,
    created_by      integer,
    created_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, id),
    CONSTRAINT credit_transactions_account_fkey FOREIGN KEY (tenant_id)
        REFERENCES billing_accounts (tenant_id) ON DELETE RESTRICT,
    CONSTRAINT credit_transactions_idempotency_key UNIQUE (tenant_id, idempotency_key),
    CONSTRAINT credit_transactions_kind_valid CHECK (kind IN ('grant', 'debit', 'refund', 'adjustment')),
    CONSTRAINT credit_transactions_sign CHECK (
        (kind IN ('grant', 'refund') AND amount > 0) OR (kind = 'debit' AND amount < 0)
        OR (kind = 'adjustment' AND amount <> 0)),
    CONSTRAINT credit_transactions_balance_not_negative CHECK (balance_after >= 0)
);
CREATE INDEX IF NOT EXISTS idx_credit_transactions_tenant_created ON credit_transactions (tenant_id, created_at DESC);

CREATE TABLE IF NOT EXISTS pme_analyses (
    tenant_id    uuid NOT NULL REFERENCES tenants (id) ON DELETE RESTRICT,
    id           uuid NOT NULL DEFAULT gen_random_uuid(),
    company_name varchar(255) NOT NULL,
    sector       varchar(100),
    fiscal_year  smallint,
    status       varchar(20) NOT NULL DEFAULT 'draft',
    inputs       jsonb NOT NULL DEFAULT '{}'::jsonb,
    results      jsonb,
    score        numeric(5, 2),
    created_at   timestamptz NOT NULL DEFAULT now(),
    updated_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, id),
    CONSTRAINT pme_analyses_status_valid CHECK (status IN ('draft', 'running', 'completed', 'failed')),
    CONSTRAINT pme_analyses_fiscal_year_range CHECK (fiscal_year IS NULL OR fiscal_year BETWEEN 1900 AND 2100),
    CONSTRAINT pme_analyses_score_range CHECK (score IS NULL OR score BETWEEN 0 AND 100)
);
CREATE INDEX IF NOT EXISTS idx_pme_analyses_tenant_created ON pme_analyses (tenant_id, created_at DESC);
CREATE OR REPLACE TRIGGER pme_analyses_touch_updated_at
    BEFORE UPDATE ON pme_analyses
    FOR EACH ROW EXECUTE FUNCTION app.touch_updated_at();

-- Finding a key before its tenant is known (the key's prefix is random, so this is selective).
CREATE INDEX IF NOT EXISTS idx_api_keys_prefix ON api_keys (prefix);
CREATE INDEX IF NOT EXISTS idx_crm_deals_tenant_lead ON crm_deals (tenant_id, lead_id);
