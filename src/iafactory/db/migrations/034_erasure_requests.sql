-- 034: erasure requests (issue 15). A tenant's owner asks for the erasure of the tenant's data; a
-- platform administrator confirms it; an operator then runs `iafactory tenants erase SLUG --confirm
-- SLUG --confirmed-request`, which refuses unless a confirmed request exists (the erasure itself
-- needs operator rights: portability.erase_tenant). A tenant table like the others (tenant_id
-- leads its key and its policy), so a tenant's requests are exported, imported and erased with
-- it; what outlives the erasure is tenant_erasures' note, which names the request.
-- The application may record a request (pending) and cancel a pending one; only
-- platform.confirm_erasure_request (a platform administrator or an operator) confirms one.

CREATE TABLE IF NOT EXISTS erasure_requests (
    tenant_id    uuid NOT NULL DEFAULT app.current_tenant_id() REFERENCES tenants (id) ON DELETE RESTRICT,
    id           uuid NOT NULL DEFAULT gen_random_uuid(),
    status       varchar(20) NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'confirmed', 'cancelled')),
    reason       varchar(2000) NOT NULL DEFAULT '',
    requested_by integer REFERENCES users (id) ON DELETE SET NULL,
    created_at   timestamptz NOT NULL DEFAULT now(),
    decided_by   integer REFERENCES users (id) ON DELETE SET NULL,
    decided_at   timestamptz,
    PRIMARY KEY (tenant_id, id)
);
-- At most one open (pending or confirmed) request per tenant.
CREATE UNIQUE INDEX IF NOT EXISTS uq_erasure_requests_open ON erasure_requests (tenant_id)
    WHERE status IN ('pending', 'confirmed');
CREATE INDEX IF NOT EXISTS idx_erasure_requests_tenant_created ON erasure_requests (tenant_id, created_at DESC);

ALTER TABLE erasure_requests OWNER TO iaf_owner;
ALTER TABLE erasure_requests ENABLE ROW LEVEL SECURITY;
ALTER TABLE erasure_requests FORCE ROW LEVEL SECURITY;
DROP POLICY IF EXISTS tenant_isolation ON erasure_requests;
CREATE POLICY tenant_isolation ON erasure_requests AS PERMISSIVE FOR ALL TO PUBLIC
    USING (tenant_id = app.current_tenant_id()) WITH CHECK (tenant_id = app.current_tenant_id());
DROP POLICY IF EXISTS definer_all ON erasure_requests;
CREATE POLICY definer_all ON erasure_requests AS PERMISSIVE FOR ALL TO iaf_owner USING (true) WITH CHECK (true);
REVOKE ALL ON erasure_requests FROM PUBLIC;
-- DELETE as on every tenant table (an earlier migration run again grants it to all of them); the
-- application never deletes a request: a cancelled one stays as history until the tenant is erased.
GRANT SELECT, INSERT, UPDATE, DELETE ON erasure_requests TO iaf_app;

-- The application's session (outside the definer functions) records pending requests and cancels
-- pending ones, nothing else: a tenant cannot confirm its own request.
CREATE OR REPLACE FUNCTION app.erasure_request_rules() RETURNS trigger
    LANGUAGE plpgsql
    AS $$
BEGIN
    IF NOT app.is_application_session() OR current_user = 'iaf_owner' THEN
        RETURN NEW;
    END IF;
    IF TG_OP = 'INSERT' AND (NEW.status <> 'pending' OR NEW.decided_by IS NOT NULL OR NEW.decided_at IS NOT NULL) THEN
        RAISE EXCEPTION 'an erasure request starts pending' USING ERRCODE = 'insufficient_privilege';
    END IF;
    IF TG_OP = 'UPDATE' AND NOT (OLD.status = 'pending' AND NEW.status = 'cancelled'
                                 AND NEW.tenant_id = OLD.tenant_id AND NEW.id = OLD.id
                                 AND NEW.requested_by IS NOT DISTINCT FROM OLD.requested_by
                                 AND NEW.created_at = OLD.created_at AND NEW.reason = OLD.reason) THEN
        RAISE EXCEPTION 'only a platform administrator confirms an erasure request; a tenant may cancel a pending one'
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    RETURN NEW;
END
$$;
DROP TRIGGER IF EXISTS erasure_request_rules ON erasure_requests;
CREATE TRIGGER erasure_request_rules BEFORE INSERT OR UPDATE ON erasure_requests
    FOR EACH ROW EXECUTE FUNCTION app.erasure_request_rules();

-- Open requests of every tenant of this cell (platform administrators, operators), oldest first,
-- with the tenant's slug and name and the requester's email. A read across tenants: the platform's.
CREATE OR REPLACE FUNCTION platform.erasure_requests(p_status text)
    RETURNS TABLE (tenant_id uuid, id uuid, slug text, tenant_name text, status text, reason text,
                   requested_by integer, requested_by_email text, created_at timestamptz,
                   decided_by integer, decided_at timestamptz)
    LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = ''
    AS $$
#variable_conflict use_column
BEGIN
    PERFORM app.assert_platform_operator();
    RETURN QUERY
        SELECT r.tenant_id, r.id, t.slug::text, t.name::text, r.status::text, r.reason::text, r.requested_by,
               u.email::text, r.created_at, r.decided_by, r.decided_at
          FROM public.erasure_requests r
          JOIN public.tenants t ON t.id = r.tenant_id
          LEFT JOIN public.users u ON u.id = r.requested_by
         WHERE p_status IS NULL OR r.status = p_status
         ORDER BY r.created_at, r.id
         LIMIT 1000;
END
$$;

-- Confirm tenant p_tenant's pending request, as platform user p_user (NULL: an operator). Returns
-- the status of the tenant's open request after the call ('confirmed'), NULL when it has none
-- (none asked, or cancelled). Audited in the tenant's log.
CREATE OR REPLACE FUNCTION platform.confirm_erasure_request(p_tenant uuid, p_user integer)
    RETURNS TABLE (id uuid, status text)
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = ''
    AS $$
#variable_conflict use_column
DECLARE
    v_id uuid;
BEGIN
    PERFORM app.assert_platform_operator();
    UPDATE public.erasure_requests r SET status = 'confirmed', decided_by = p_user, decided_at = now()
     WHERE r.tenant_id = p_tenant AND r.status = 'pending'
    RETURNING r.id INTO v_id;
    IF v_id IS NOT NULL THEN
        PERFORM app.record_event(p_tenant, 'tenant.erasure_confirmed', p_user,
                                 jsonb_build_object('request', v_id), NULL, NULL);
    END IF;
    RETURN QUERY SELECT r.id, r.status::text FROM public.erasure_requests r
                  WHERE r.tenant_id = p_tenant AND r.status IN ('pending', 'confirmed');
END
$$;

CALL app.lock_down_functions();
